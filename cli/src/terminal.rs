//! The terminal: chat's line input and the password prompt.
//!
//! On a terminal, chat reads lines with rustyline on a thread of its own
//! (reading is blocking) and prints incoming messages through rustyline's
//! external printer, which draws them above the line being typed. Piped
//! input (scripts, tests) is read line by line with no editor.
//!
//! rustyline puts the terminal in raw mode while a line is being edited. If
//! chat ends while that thread is still waiting for a line (the relay went
//! away, say), the thread cannot be interrupted, so the terminal mode saved
//! at the start is restored here before the process exits.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, Result};
use nix::sys::termios::{self, LocalFlags, SetArg, Termios};
use rustyline::error::ReadlineError;
use tokio::sync::mpsc;

use crate::output::Output;

/// A line of chat input.
pub enum Line {
    Text(String),
    /// Ctrl-D, Ctrl-C at the prompt, or the end of piped input.
    End,
}

pub struct Input {
    /// Lines from the reader thread.
    rx: mpsc::UnboundedReceiver<Line>,
    /// The terminal mode before the editor touched it, to put back.
    saved: Option<Termios>,
}

/// Whether both ends are a terminal, so line editing makes sense.
pub fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

impl Input {
    /// Starts reading. With `editor`, routes `out`'s human output through
    /// the editor's printer until [`Input::stop`].
    pub fn start(out: &Output, editor: bool, prompt: &str) -> Result<Input> {
        let (tx, rx) = mpsc::unbounded_channel();
        if editor {
            let saved = termios::tcgetattr(std::io::stdin()).ok();
            let mut editor = rustyline::DefaultEditor::new().context("starting the line editor")?;
            let printer = editor
                .create_external_printer()
                .context("starting the line editor's printer")?;
            out.use_printer(Box::new(printer));
            let prompt = prompt.to_owned();
            std::thread::spawn(move || {
                loop {
                    match editor.readline(&prompt) {
                        Ok(line) => {
                            let _ = editor.add_history_entry(line.as_str());
                            if tx.send(Line::Text(line)).is_err() {
                                break;
                            }
                        }
                        Err(ReadlineError::Interrupted | ReadlineError::Eof) | Err(_) => {
                            let _ = tx.send(Line::End);
                            break;
                        }
                    }
                }
            });
            Ok(Input { rx, saved })
        } else {
            std::thread::spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    if tx.send(Line::Text(line)).is_err() {
                        return;
                    }
                }
                let _ = tx.send(Line::End);
            });
            Ok(Input { rx, saved: None })
        }
    }

    /// The next line; `End` once input is over.
    pub async fn next(&mut self) -> Line {
        self.rx.recv().await.unwrap_or(Line::End)
    }

    /// Gives the terminal back: plain output, original mode.
    pub fn stop(mut self, out: &Output) {
        out.use_std();
        self.restore();
    }

    fn restore(&mut self) {
        if let Some(saved) = self.saved.take() {
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &saved);
        }
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Reads a password: from the terminal without echo, or the first line of
/// piped stdin (for scripts: `echo "$PW" | relay-cli login alice`).
pub fn read_password(prompt: &str) -> Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        let password = line.trim_end_matches(['\n', '\r']).to_owned();
        anyhow::ensure!(!password.is_empty(), "no password on stdin");
        return Ok(password);
    }
    let saved = termios::tcgetattr(&stdin).context("reading the terminal mode")?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    quiet.local_flags.insert(LocalFlags::ECHONL);
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    termios::tcsetattr(&stdin, SetArg::TCSANOW, &quiet).context("turning off echo")?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = termios::tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    read.context("reading the password")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}
