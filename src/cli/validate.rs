//! `stasis validate`: checks service files (all in the config dir, or those named) without
//! starting anything, reporting every problem with file, line and key; also kill ports used twice.

use super::error::Error;
use super::exit_codes;
use super::output::print_json;
use crate::config::{discover, load_service, ConfigError, Problem};
use crate::paths::Dirs;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Serialize)]
struct FileResult {
    file: String,
    ok: bool,
    problems: Vec<Problem>,
}

pub fn run(dirs: &Dirs, targets: &[String], json: bool) -> Result<i32, Error> {
    let targets: Vec<String> = if targets.is_empty() {
        discover(dirs)?.into_iter().map(|p| p.display().to_string()).collect()
    } else {
        targets.to_vec()
    };
    if targets.is_empty() {
        eprintln!("stasis: no service files in {} (nothing to validate)", dirs.config_dir.display());
    }
    let mut results = Vec::new();
    let mut ports: BTreeMap<u16, String> = BTreeMap::new();
    for t in &targets {
        let file = if t.contains('/') || t.ends_with(".yaml") {
            t.clone()
        } else {
            dirs.service_file(t).display().to_string()
        };
        let mut problems = match load_service(dirs, t) {
            Ok(s) => match ports.insert(s.kill_port, file.clone()) {
                Some(other) => vec![Problem {
                    line: None,
                    key: "kill_port".into(),
                    message: format!(
                        "port {} is also the kill port of {other}; every service needs its own",
                        s.kill_port
                    ),
                }],
                None => Vec::new(),
            },
            Err(e) => problems_of(e),
        };
        problems.iter_mut().for_each(|p| p.message = p.message.replace('\n', " "));
        results.push(FileResult { ok: problems.is_empty(), file, problems });
    }
    let ok = results.iter().all(|r| r.ok);
    if json {
        print_json(&results);
    } else {
        for r in &results {
            if r.ok {
                println!("ok      {}", r.file);
            } else {
                println!("invalid {}", r.file);
                for p in &r.problems {
                    println!("  {p}");
                }
            }
        }
    }
    Ok(if ok { exit_codes::OK } else { exit_codes::CONFIG })
}

fn problems_of(e: ConfigError) -> Vec<Problem> {
    e.problems()
}
