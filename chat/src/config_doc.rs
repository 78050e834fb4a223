//! The README's configuration table, rendered from the command line ([`crate::cli::Cli`]), so
//! the documented flags, environment twins and defaults are the ones `chat` really has.
//!
//! README.md holds the table between [`TABLE_START`] and [`TABLE_END`]; a test fails when it
//! differs from [`markdown_table`]. Regenerate it with `CHAT_UPDATE_README=1 cargo test -p chat
//! --lib config_doc`, or print it with the hidden `chat config-table`.

/// Marker comment opening the generated table in README.md.
pub const TABLE_START: &str = "<!-- config-table:start -->";
/// Marker comment closing the generated table in README.md.
pub const TABLE_END: &str = "<!-- config-table:end -->";

/// What the top-level command (no subcommand) is called in the table.
const ROOT_LABEL: &str = "all-in-one";

/// One row: a flag as one or more commands have it.
struct Row {
    flag: String,
    env: String,
    default: String,
    meaning: String,
    commands: Vec<String>,
}

/// The markdown table (flag, env, default, commands, meaning) of every visible flag of
/// `command` and of its visible subcommands. A flag that several commands share with the same
/// env, default and meaning is one row; one that differs (e.g. the fanout worker's `--listen`)
/// gets a row of its own.
pub fn markdown_table(command: &clap::Command) -> String {
    let mut rows = Vec::new();
    add_rows(&mut rows, command, ROOT_LABEL);
    for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set() && sub.get_name() != "help") {
        add_rows(&mut rows, sub, sub.get_name());
    }
    let mut table = String::from("| flag | env | default | commands | meaning |\n|---|---|---|---|---|\n");
    for row in rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            row.flag,
            row.env,
            row.default,
            row.commands.join(", "),
            row.meaning
        ));
    }
    table
}

/// Adds the flags of `command` (not of its subcommands) to `rows`.
fn add_rows(rows: &mut Vec<Row>, command: &clap::Command, label: &str) {
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if arg.is_hide_set() || matches!(arg.get_id().as_str(), "help" | "version") {
            continue;
        }
        let row = Row {
            flag: code(&format!("--{long}{}", value_hint(arg))),
            env: arg.get_env().map_or_else(String::new, |env| code(&env.to_string_lossy())),
            default: default_cell(arg),
            meaning: cell(&arg.get_help().or_else(|| arg.get_long_help()).map(ToString::to_string).unwrap_or_default()),
            commands: vec![label.to_owned()],
        };
        match rows
            .iter_mut()
            .find(|r| (&r.flag, &r.env, &r.default, &r.meaning) == (&row.flag, &row.env, &row.default, &row.meaning))
        {
            Some(same) if !same.commands.iter().any(|c| c == label) => same.commands.push(label.to_owned()),
            Some(_) => {}
            None => rows.push(row),
        }
    }
}

/// ` VALUE` after the flag: its possible values (`text|json`) or its value name.
fn value_hint(arg: &clap::Arg) -> String {
    if !arg.get_action().takes_values() {
        return String::new();
    }
    let possible: Vec<String> =
        arg.get_possible_values().iter().filter(|v| !v.is_hide_set()).map(|v| v.get_name().to_owned()).collect();
    if !possible.is_empty() {
        return format!(" {}", possible.join("|"));
    }
    match arg.get_value_names() {
        Some(names) if !names.is_empty() => {
            format!(" {}", names.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(" "))
        }
        _ => format!(" {}", arg.get_id().as_str().to_uppercase()),
    }
}

fn default_cell(arg: &clap::Arg) -> String {
    let defaults: Vec<String> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
    if defaults.is_empty() {
        "unset".to_owned()
    } else {
        code(&defaults.join(","))
    }
}

/// `text` as inline code in a table cell.
fn code(text: &str) -> String {
    format!("`{}`", cell(text))
}

/// `text` made safe for one table cell: one line, pipes escaped.
fn cell(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "\\|")
}

/// `readme` with `table` between the markers, or `None` when the markers are missing or out
/// of order.
pub fn with_table(readme: &str, table: &str) -> Option<String> {
    let start = readme.find(TABLE_START)? + TABLE_START.len();
    let end = start + readme[start..].find(TABLE_END)?;
    Some(format!("{}\n{table}{}", &readme[..start], &readme[end..]))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use clap::CommandFactory;

    use super::*;
    use crate::cli::Cli;

    /// Fails when README.md's configuration table is not the one the flags render; with
    /// `CHAT_UPDATE_README=1` it rewrites the table instead.
    #[test]
    fn readme_configuration_table_is_generated_from_the_flags() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let readme = std::fs::read_to_string(&path).expect("README.md");
        let table = markdown_table(&Cli::command());
        let fresh = with_table(&readme, &table)
            .unwrap_or_else(|| panic!("README.md lacks the markers {TABLE_START} ... {TABLE_END}"));
        if fresh == readme {
            return;
        }
        if std::env::var("CHAT_UPDATE_README").is_ok_and(|v| v == "1") {
            std::fs::write(&path, fresh).expect("rewrite README.md");
            return;
        }
        panic!(
            "README.md's configuration table differs from the flags. Regenerate it with\n\n    \
             CHAT_UPDATE_README=1 cargo test -p chat --lib config_doc\n\n(or put the output of \
             `cargo run -q -- config-table` between the markers). The fresh table:\n\n{table}"
        );
    }

    #[test]
    fn the_table_has_every_flag_once_per_meaning() {
        let table = markdown_table(&Cli::command());
        for flag in [
            "`--roster-interval-ms MS`",
            "`--otlp-endpoint URL`",
            "`--worker-id ID`",
            "`--cql-local-dc DC`",
            "`--cql-request-timeout-ms MS`",
            "`--ack-wait-ms MS`",
            "`--max-batch N`",
            "`--log-format text\\|json`",
        ] {
            assert_eq!(table.matches(&format!("| {flag} |")).count(), 1, "{flag} in\n{table}");
        }
        // The same flag with another default is a row of its own.
        assert!(
            table.contains("| `--listen ADDR` | `CHAT_LISTEN` | `127.0.0.1:8080` | all-in-one, gateway |"),
            "{table}"
        );
        assert!(table.contains("| `--listen ADDR` | `CHAT_LISTEN` | `127.0.0.1:9180` | fanout |"), "{table}");
        // The same flag with another meaning too.
        assert!(table.contains("| `--admin-token T` | `CHAT_ADMIN_TOKEN` | unset | all-in-one, gateway |"), "{table}");
        assert!(table.contains("| `--admin-token T` | `CHAT_ADMIN_TOKEN` | unset | trace |"), "{table}");
        assert!(!table.contains("config-table"), "hidden subcommands stay out:\n{table}");
    }

    #[test]
    fn the_table_goes_between_the_markers() {
        let readme = format!("a\n{TABLE_START}\nold\n{TABLE_END}\nb\n");
        assert_eq!(with_table(&readme, "new\n").unwrap(), format!("a\n{TABLE_START}\nnew\n{TABLE_END}\nb\n"));
        assert_eq!(with_table("no markers", "new\n"), None);
        assert_eq!(with_table(&format!("{TABLE_END}\n{TABLE_START}"), "new\n"), None);
    }
}
