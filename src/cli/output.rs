//! Printing for humans or, with --json, for scripts (one JSON document on stdout).

pub fn print_json<T: serde::Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("serializable"));
}

/// Where `Progress: ` lines go while a command waits on a dump or a restore: on a terminal one
/// status line redrawn in place; in a pipe or a log each line as it comes (no `\r`); with
/// --json nowhere. Other lines are printed as they are (above the status line on a terminal).
pub struct ProgressLines {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
}

impl ProgressLines {
    pub fn new(json: bool) -> ProgressLines {
        use std::io::IsTerminal;
        let bar = (!json && std::io::stdout().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        });
        ProgressLines { bar, quiet: json }
    }

    pub fn show(&self, line: &str) {
        match &self.bar {
            Some(b) if line.starts_with(crate::supervisor::protocol::PROGRESS_PREFIX) => {
                b.set_message(line.to_string())
            }
            Some(b) => b.println(line),
            None if !self.quiet => println!("{line}"),
            None => {}
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
