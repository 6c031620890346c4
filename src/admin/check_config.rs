//! `relay check-config`: the effective configuration, as a TOML file that
//! `--config` would accept, each value annotated with where it came from.
//! Secrets are masked (the database URL keeps everything but its
//! password), so the output is safe to paste into a ticket.

use std::fmt::Write as _;

use super::{AdminError, Outcome};
use crate::config::{Config, Setting, Source};

pub fn run(config: &Config, settings: &[Setting]) -> Result<Outcome, AdminError> {
    // Parsing already succeeded; the one thing left that can be wrong
    // before the server starts without touching the network is TLS.
    let tls = match (&config.tls.tls_cert, &config.tls.tls_key) {
        (Some(cert), Some(key)) => {
            crate::server::tls::acceptor(cert, key)?;
            "TLS certificate and key load"
        }
        _ => "TLS off (no --tls-cert/--tls-key): serving ws://",
    };
    let mut output = String::from(
        "# Effective relay configuration: defaults < --config file < environment < flags.\n\
         # Secrets are masked.\n",
    );
    let _ = writeln!(output, "# {tls}");
    // `Some(heading)` once a group has been started.
    let mut group: Option<Option<&str>> = None;
    for setting in settings {
        let heading = setting.heading.as_deref();
        if group != Some(heading) {
            group = Some(heading);
            let _ = writeln!(output, "\n# {}", heading.unwrap_or("General"));
        }
        let source = match setting.source {
            Source::Default => "default".to_owned(),
            Source::File => "config file".to_owned(),
            Source::Env => format!("env {}", setting.env.as_deref().unwrap_or("")),
            Source::Flag => "flag".to_owned(),
        };
        match &setting.value {
            // The file cannot name itself: shown, but as a comment, so the
            // output stays a file `--config` accepts.
            Some(value) if setting.name == "config" => {
                let _ = writeln!(output, "# config = {}  # {source}", toml_value(value));
            }
            Some(value) => {
                let _ = writeln!(
                    output,
                    "{} = {}  # {source}",
                    setting.name,
                    toml_value(value)
                );
            }
            None => {
                let _ = writeln!(output, "# {} is unset", setting.name);
            }
        }
    }
    Ok(Outcome::success(output))
}

/// A value as TOML: numbers and booleans bare, anything else a string.
fn toml_value(value: &str) -> String {
    if value.parse::<i64>().is_ok()
        || value.parse::<f64>().is_ok_and(f64::is_finite)
        || value == "true"
        || value == "false"
    {
        value.to_owned()
    } else {
        format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
    }
}
