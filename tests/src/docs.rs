//! What keeps the documentation true: the configuration reference
//! (`docs/configuration.md`), rendered here from the binaries' own clap definitions,
//! and the checks of `tests/tests/docs.rs` (links and anchors, quoted log lines).
//!
//! Regenerate the page after changing a flag:
//! `cargo run -p tests --bin config-reference > docs/configuration.md`.

use std::fmt::Write as _;

use clap::{Arg, ArgAction, Command};

/// The command that writes the page, as the page and the failing test say it.
pub const REGENERATE: &str = "cargo run -p tests --bin config-reference > docs/configuration.md";

/// Every binary of the workspace with its command line, in the order of the pipeline.
pub fn binaries() -> Vec<Command> {
    use sensor_sim::sensor::{SensorConfig, PRESSURE, TEMPERATURE};
    vec![
        SensorConfig::command(&TEMPERATURE),
        SensorConfig::command(&PRESSURE),
        <device_status::Config as clap::CommandFactory>::command(),
        <mqtt_subscriber::Config as clap::CommandFactory>::command(),
        <edge_relay::Config as clap::CommandFactory>::command(),
        <mongo_persister::Config as clap::CommandFactory>::command(),
        readings::Cli::command(),
    ]
}

/// `docs/configuration.md` as the binaries define their flags today.
pub fn configuration_reference() -> String {
    let mut page = String::new();
    page.push_str(&format!(
        "# Configuration reference\n\n\
         <!-- Generated from the binaries' own flag definitions by `{REGENERATE}`;\n\
         tests/tests/docs.rs fails when this page differs from what they say. Edit the\n\
         flags' doc comments, not this page. -->\n\n\
         Every flag of every binary, with the environment variable it falls back to and its\n\
         default. A flag given on the command line wins over the variable; a `.env` file in\n\
         the working directory is read too, and variables already set win over it. A\n\
         missing or malformed setting is one line on stderr naming the flag and its\n\
         variable, exit code 2. `--help` shows the same, and `--version` the version.\n\n"
    ));
    let commands = binaries();
    page.push_str(&without_variable(&commands));
    for command in &commands {
        let name = command.get_name();
        let _ = writeln!(page, "- [`{name}`](#{name})");
    }
    page.push('\n');
    for command in &commands {
        render_command(&mut page, command, 2);
    }
    page.truncate(page.trim_end().len());
    page.push('\n');
    page
}

/// Why a flag has no environment variable. A standing setting of a service has one; what
/// one invocation asks or does has none, so that a variable left set in a shell or a
/// `.env` cannot change every later run. A flag with neither makes the page panic.
fn why_no_variable(command: &str, flag: &str) -> Option<&'static str> {
    match (command, flag) {
        ("readings range" | "readings stats" | "readings gaps", _) => Some(
            "they say what one query asks (and `gaps --repair` asks the devices once): a \
             variable left set would change the answer of every later query",
        ),
        ("mongo-persister", "retire") => Some(
            "a one-off action on a replica removed for good; a variable would repeat it on \
             every start",
        ),
        ("mongo-persister", "no-repair") => Some(
            "a switch for tests and benchmarks, which give it where they start the \
             persister; a service keeps self-healing on",
        ),
        ("temperature-sensor" | "pressure-sensor", "no-retain") => Some(
            "the variable of `--retain` says the same (`TEMPERATURE_RETAIN=false`, \
             `PRESSURE_RETAIN=false`)",
        ),
        _ => None,
    }
}

/// The paragraph naming every flag without an environment variable, grouped by why.
fn without_variable(commands: &[Command]) -> String {
    fn walk<'a>(command: &'a Command, path: String, top: bool, found: &mut Vec<(String, &'a Arg)>) {
        for arg in command.get_arguments() {
            if arg.get_env().is_none()
                && !matches!(arg.get_id().as_str(), "help" | "version")
                && (top || !arg.is_global_set())
            {
                found.push((path.clone(), arg));
            }
        }
        for subcommand in command.get_subcommands() {
            walk(
                subcommand,
                format!("{path} {}", subcommand.get_name()),
                false,
                found,
            );
        }
    }
    let mut found = Vec::new();
    for command in commands {
        walk(command, command.get_name().to_string(), true, &mut found);
    }
    // Reasons in the order they first come, each with its commands' flags.
    type Flags = Vec<(String, Vec<String>)>;
    let mut reasons: Vec<(&str, Flags)> = Vec::new();
    for (path, arg) in found {
        let flag = arg.get_long().unwrap_or(arg.get_id().as_str()).to_string();
        let Some(why) = why_no_variable(&path, &flag) else {
            panic!(
                "`{path} --{flag}` has no environment variable: give it one (clap's `env`), \
                 or say why not in why_no_variable (tests/src/docs.rs)"
            );
        };
        let at = match reasons.iter().position(|(reason, _)| *reason == why) {
            Some(at) => at,
            None => {
                reasons.push((why, Vec::new()));
                reasons.len() - 1
            }
        };
        let flags = &mut reasons[at].1;
        match flags.iter_mut().find(|(command, _)| *command == path) {
            Some((_, list)) => list.push(flag),
            None => flags.push((path, vec![flag])),
        }
    }
    let mut text =
        String::from("Flags without an environment variable (`—` in the tables), and why:\n\n");
    for (why, flags) in reasons {
        let named: Vec<String> = flags
            .iter()
            .map(|(command, list)| match list.as_slice() {
                [one] => format!("`{command} --{one}`"),
                many => format!(
                    "`{command}` {}",
                    many.iter()
                        .map(|flag| format!("`--{flag}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
            .collect();
        let _ = writeln!(text, "- {}: {why}.", named.join("; "));
    }
    text.push('\n');
    text
}

/// A command's section: what it is, its flags grouped by their help heading, then its
/// subcommands, each with its own flags.
fn render_command(page: &mut String, command: &Command, level: usize) {
    let hashes = "#".repeat(level);
    let _ = writeln!(page, "{hashes} `{}`\n", command.get_name());
    if let Some(about) = command.get_long_about().or(command.get_about()) {
        let _ = writeln!(page, "{}\n", one_line(&about.to_string()));
    }
    // In the order of `--help` (flags changed after derive, such as the sensors' own
    // variable names, move to the end of the list but keep their place in the help).
    let mut args: Vec<&Arg> = command
        .get_arguments()
        .filter(|arg| !matches!(arg.get_id().as_str(), "help" | "version"))
        .filter(|arg| level == 2 || !arg.is_global_set())
        .collect();
    args.sort_by_key(|arg| arg.get_display_order());
    let mut headings: Vec<Option<&str>> = Vec::new();
    for arg in &args {
        if !headings.contains(&arg.get_help_heading()) {
            headings.push(arg.get_help_heading());
        }
    }
    for heading in headings {
        if let Some(heading) = heading {
            let _ = writeln!(page, "{hashes}# {heading} (`{}`)\n", command.get_name());
        }
        page.push_str("| flag | variable | default | meaning |\n| --- | --- | --- | --- |\n");
        for arg in args.iter().filter(|arg| arg.get_help_heading() == heading) {
            page.push_str(&row(arg));
        }
        page.push('\n');
    }
    for subcommand in command.get_subcommands() {
        render_command(page, subcommand, level + 1);
    }
}

/// One flag's row: `--flag <VALUE>`, its variable, its default, its meaning (with the
/// values it takes).
fn row(arg: &Arg) -> String {
    let long = arg.get_long().map_or_else(
        || format!("<{}>", arg.get_id().as_str().to_uppercase()),
        |long| format!("--{long}"),
    );
    let takes_value = !matches!(
        arg.get_action(),
        ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count
    );
    let flag = match (takes_value, arg.get_value_names()) {
        (false, _) => long,
        (true, Some(names)) => format!("{long} <{}>", names[0]),
        (true, None) => format!("{long} <{}>", arg.get_id().as_str().to_uppercase()),
    };
    let variable = arg.get_env().map_or("—".to_string(), |env| {
        format!("`{}`", env.to_string_lossy())
    });
    let help = arg
        .get_long_help()
        .or(arg.get_help())
        .map(|help| one_line(&help.to_string()))
        .unwrap_or_default();
    // A default said in words in the help text ("[default: the rules' filters]").
    let (mut meaning, said) = match help.find("[default: ").and_then(|at| {
        let end = at + help[at..].find(']')?;
        Some((at, end))
    }) {
        Some((at, end)) => (
            format!("{}{}", help[..at].trim_end(), &help[end + 1..]),
            Some(help[at + 10..end].to_string()),
        ),
        None => (help, None),
    };
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|value| value.to_string_lossy().into_owned())
        .collect();
    let default = match (defaults.is_empty() || !takes_value, said) {
        (_, Some(said)) => text(&said),
        (false, None) => format!("`{}`", defaults.join(",")),
        (true, None) => "—".to_string(),
    };
    let values: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|value| !value.is_hide_set())
        .map(|value| format!("`{}`", value.get_name()))
        .collect();
    let boolean = matches!(values.as_slice(), [t, f] if t == "`true`" && f == "`false`");
    if takes_value && !values.is_empty() && !boolean {
        let _ = write!(meaning, " (one of {})", values.join(", "));
    }
    if arg.get_value_delimiter() == Some(',') {
        meaning.push_str("; the variable takes several, comma-separated");
    }
    format!(
        "| `{}` | {variable} | {default} | {} |\n",
        flag.replace('|', "\\|"),
        text(&meaning)
    )
}

/// Help text on one line: its lines joined by spaces.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Help text inside a Markdown table cell: `|` would end the cell, and `<device>` would
/// be read as an HTML tag and vanish.
fn text(help: &str) -> String {
    help.replace('|', "\\|")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
