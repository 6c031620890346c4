//! Keeps the documentation of the settings true: `relay.example.toml` must
//! hold every setting at its default, and the README's flag table must name
//! real flags, their variables and their defaults. The list of settings
//! comes from clap, so a new setting fails these tests until it is
//! documented.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::{Arg, CommandFactory};

use super::Config;

/// Settings whose default depends on the machine: the example file names
/// them only in a comment, since any value written there would be wrong
/// somewhere.
const MACHINE_DEPENDENT: &[&str] = &["argon2-concurrency"];

/// What `relay --help` calls the settings that have no heading.
const GENERAL: &str = "General";

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// Every setting, by flag name: each clap argument but `--config` itself
/// and clap's own `--help` and `--version`.
fn settings() -> BTreeMap<String, Arg> {
    let command = Config::command();
    command
        .get_arguments()
        .filter(|arg| !matches!(arg.get_id().as_str(), "config" | "help" | "version"))
        .map(|arg| {
            let long = arg
                .get_long()
                .unwrap_or_else(|| panic!("setting {} has no flag", arg.get_id()));
            (long.to_owned(), arg.clone())
        })
        .collect()
}

/// The setting's single default, as clap renders it; `None` when it has
/// none.
fn default_of(arg: &Arg) -> Option<String> {
    match arg.get_default_values() {
        [] => None,
        [one] => Some(one.to_string_lossy().into_owned()),
        many => panic!("{} has several defaults: {many:?}", arg.get_id()),
    }
}

/// True when the TOML `value` is the same setting as clap's `default`
/// string: numbers compare as numbers (`200.0` is clap's `200`).
fn same_value(value: &toml::Value, default: &str) -> bool {
    match value {
        toml::Value::String(s) => s == default,
        toml::Value::Integer(i) => default.parse::<i64>() == Ok(*i),
        toml::Value::Float(f) => default.parse::<f64>() == Ok(*f),
        toml::Value::Boolean(b) => default.parse::<bool>() == Ok(*b),
        _ => false,
    }
}

/// One key of the example file: whether it is live or commented out, and
/// the `## Heading` it sits under.
struct Entry {
    heading: String,
    active: bool,
}

/// Reads the keys of the example file, live ones and commented-out ones (a
/// comment line that is itself a valid `key = value`), with their headings.
fn example_entries(text: &str) -> BTreeMap<String, Entry> {
    let mut entries = BTreeMap::new();
    let mut heading = None::<String>;
    for line in text.lines().map(str::trim) {
        if let Some(h) = line.strip_prefix("## ") {
            heading = Some(h.trim().to_owned());
            continue;
        }
        let (active, body) = match line.strip_prefix('#') {
            Some(rest) => (false, rest.trim()),
            None => (true, line),
        };
        // A comment is a commented-out setting only if it parses as one.
        let Ok(table) = body.parse::<toml::Table>() else {
            assert!(!active, "not TOML: {line}");
            continue;
        };
        let Some((key, _)) = table.iter().next() else {
            continue;
        };
        let heading = heading
            .clone()
            .unwrap_or_else(|| panic!("{key} comes before the first `## Heading`"));
        let previous = entries.insert(key.clone(), Entry { heading, active });
        assert!(
            previous.is_none(),
            "{key} appears twice in the example file"
        );
    }
    entries
}

#[test]
fn example_file_documents_every_setting_at_its_default() {
    let path = repo_file("relay.example.toml");
    let text = std::fs::read_to_string(&path).expect("relay.example.toml exists");

    let live: toml::Table = text.parse().expect("valid TOML");
    let settings = settings();
    let entries = example_entries(&text);
    let mut problems = Vec::new();

    // The server accepts the file as it is: no unknown key, no bad value.
    let path_arg = path.to_str().expect("UTF-8 path");
    if let Err(err) = Config::load_from(["relay", "--config", path_arg]) {
        let why = match std::error::Error::source(&err) {
            Some(source) => format!("{err}: {source}"),
            None => err.to_string(),
        };
        problems.push(format!("`relay --config` refuses it: {why}"));
    }

    // (a) Every live key is a setting, spelled as its flag.
    for key in live.keys() {
        if !settings.contains_key(key) {
            problems.push(format!("{key}: not a setting (see `relay --help`)"));
        }
    }

    // (b) Every setting is in the file, live unless it has no default or a
    // machine-dependent one, under the heading `relay --help` gives it; and
    // (c) every live value is the default.
    for (name, arg) in &settings {
        let default = default_of(arg);
        let Some(entry) = entries.get(name) else {
            let shown = default.as_deref().unwrap_or("no default");
            problems.push(format!("{name}: missing (default: {shown})"));
            continue;
        };
        let heading = arg.get_help_heading().unwrap_or(GENERAL);
        if entry.heading != heading {
            problems.push(format!(
                "{name}: under `## {}`, but `relay --help` lists it under {heading}",
                entry.heading
            ));
        }
        let machine_dependent = MACHINE_DEPENDENT.contains(&name.as_str());
        match (&default, machine_dependent, entry.active) {
            (Some(default), false, true) => {
                let value = &live[name.as_str()];
                if !same_value(value, default) {
                    problems.push(format!("{name} = {value:?}, but the default is {default}"));
                }
            }
            (Some(default), false, false) => problems.push(format!(
                "{name}: commented out, but it has a fixed default ({default}): uncomment it"
            )),
            (None, _, true) => problems.push(format!(
                "{name}: has no default, so the example may only show it commented out"
            )),
            (Some(_), true, true) => problems.push(format!(
                "{name}: its default depends on the machine; keep it commented out"
            )),
            (None, _, false) | (Some(_), true, false) => {}
        }
    }
    // A machine-dependent setting must still be one, or it belongs live.
    for name in MACHINE_DEPENDENT {
        if !settings.contains_key(*name) {
            problems.push(format!(
                "{name}: listed as machine-dependent, but no setting"
            ));
        }
    }

    assert!(
        problems.is_empty(),
        "relay.example.toml is out of date:\n  {}",
        problems.join("\n  ")
    );
}

/// One row of the README's configuration table.
struct Row {
    line: String,
    flags: Vec<String>,
    /// `text|json` after `--log-format`, for each flag.
    values: Vec<Option<String>>,
    envs: Vec<String>,
    defaults: String,
}

/// The `code` spans of a Markdown table cell.
fn code_spans(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.replace("\\|", "|"))
        .collect()
}

/// The rows of the table under `## Configuration` whose first cell names a
/// flag.
fn readme_rows(readme: &str) -> Vec<Row> {
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Configuration"))
        .expect("README.md has a Configuration section");
    let mut rows = Vec::new();
    for line in section.lines().filter(|l| l.starts_with('|')) {
        // Cells split on `|` but not on the escaped `\|` inside them.
        let cells: Vec<String> = line
            .replace("\\|", "\u{0}")
            .split('|')
            .map(|c| c.trim().replace('\u{0}', "\\|"))
            .collect();
        let [_, flags, envs, defaults, _] = cells.as_slice() else {
            panic!("README table row without three cells: {line}");
        };
        if !flags.contains("--") {
            continue; // the header and the separator
        }
        let (flags, values) = code_spans(flags)
            .iter()
            .map(|span| {
                let mut words = span.split_whitespace();
                let flag = words.next().unwrap_or_default();
                let flag = flag
                    .strip_prefix("--")
                    .unwrap_or_else(|| panic!("not a flag: {span} in {line}"));
                (flag.to_owned(), words.next().map(str::to_owned))
            })
            .unzip();
        rows.push(Row {
            line: line.to_owned(),
            flags,
            values,
            envs: code_spans(envs),
            defaults: defaults.clone(),
        });
    }
    rows
}

/// What a README default cell says, for one flag.
#[derive(Debug, PartialEq)]
enum Shown {
    /// A number, possibly with a unit, in the setting's own unit.
    Number(f64),
    /// A literal in backticks.
    Literal(String),
    /// "off": the setting has no default.
    Off,
    /// Prose ("cores − 1"): not checked.
    Prose,
}

/// Reads one default as the README writes it: `127.0.0.1:8080`, `25 000`,
/// `512 KiB`, `30 days`, `200/s`, `off`. Remarks after `(` or `;` and
/// units such as "frames per connection" are ignored.
fn parse_shown(text: &str, flag: &str) -> Shown {
    let text = text.split(['(', ';']).next().unwrap_or_default().trim();
    if text == "off" {
        return Shown::Off;
    }
    if let [literal] = code_spans(text).as_slice() {
        return Shown::Literal(literal.clone());
    }
    let digits: String = text
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ' ' || *c == '.')
        .filter(|c| *c != ' ')
        .collect();
    let Ok(number) = digits.parse::<f64>() else {
        return Shown::Prose;
    };
    let unit = text.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ' || c == '.');
    let scale = match unit.split_whitespace().next().unwrap_or("") {
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "days" | "day" if flag.ends_with("-secs") => 86_400.0,
        _ => 1.0,
    };
    Shown::Number(number * scale)
}

#[test]
fn readme_flag_table_names_real_flags_variables_and_defaults() {
    let readme = std::fs::read_to_string(repo_file("README.md")).expect("README.md exists");
    let settings = settings();
    let rows = readme_rows(&readme);
    assert!(rows.len() >= 10, "found only {} table rows", rows.len());
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for row in &rows {
        let line = &row.line;
        if row.flags.len() != row.envs.len() {
            problems.push(format!(
                "{line}: {} flags but {} variables",
                row.flags.len(),
                row.envs.len()
            ));
            continue;
        }
        // One default per flag, comma-separated when the row has several;
        // one default for all of them otherwise.
        let defaults: Vec<&str> = match row.defaults.split(", ").collect::<Vec<_>>() {
            parts if parts.len() == row.flags.len() => parts,
            _ => vec![row.defaults.as_str(); row.flags.len()],
        };
        for (i, flag) in row.flags.iter().enumerate() {
            let Some(arg) = settings.get(flag) else {
                problems.push(format!("{line}: --{flag} is not a setting"));
                continue;
            };
            if !seen.insert(flag.clone()) {
                problems.push(format!("{line}: --{flag} is listed twice"));
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            if env.as_deref() != Some(row.envs[i].as_str()) {
                let env = env.unwrap_or_else(|| "no variable".into());
                problems.push(format!("{line}: --{flag} reads {env}, not {}", row.envs[i]));
            }
            if let Some(values) = &row.values[i] {
                let real: Vec<String> = arg
                    .get_possible_values()
                    .iter()
                    .map(|v| v.get_name().to_owned())
                    .collect();
                if values.split('|').ne(real.iter().map(String::as_str)) {
                    problems.push(format!("{line}: --{flag} takes {}", real.join("|")));
                }
            }
            let default = default_of(arg);
            let ok = match (parse_shown(defaults[i], flag), default.as_deref()) {
                (Shown::Prose, _) => true,
                (Shown::Off, default) => default.is_none(),
                (Shown::Literal(shown), Some(default)) => shown == default,
                (Shown::Number(shown), Some(default)) => default.parse::<f64>() == Ok(shown),
                (_, None) => false,
            };
            if !ok {
                problems.push(format!(
                    "{line}: --{flag} defaults to {}",
                    default.as_deref().unwrap_or("nothing (off)")
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "README.md's configuration table is wrong:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn readme_defaults_are_read_as_written() {
    assert_eq!(parse_shown("25 000", "x"), Shown::Number(25_000.0));
    assert_eq!(
        parse_shown("512 KiB (bigger frames close with 1009)", "x"),
        Shown::Number(524_288.0)
    );
    assert_eq!(
        parse_shown("30 days", "max-ttl-secs"),
        Shown::Number(2_592_000.0)
    );
    assert_eq!(parse_shown("200/s", "x"), Shown::Number(200.0));
    assert_eq!(
        parse_shown("256 frames per connection", "x"),
        Shown::Number(256.0)
    );
    assert_eq!(
        parse_shown("`text`; filter with `RUST_LOG`", "x"),
        Shown::Literal("text".into())
    );
    assert_eq!(parse_shown("off (see `certs/README.md`)", "x"), Shown::Off);
    assert_eq!(parse_shown("cores − 1", "x"), Shown::Prose);
}
