//! Reading a service file: YAML syntax, then unknown and missing keys (all reported at once),
//! then types, then the semantic checks in `validate`.

use super::error::{ConfigError, Problem};
use super::key_lines::line_of;
use super::schema::{ServiceFile, CRIU_KEYS, TOP_LEVEL_KEYS};
use super::trust;
use super::validate::{validate, Service};
use crate::paths::Dirs;
use serde_yaml::Value;
use std::path::{Path, PathBuf};

const REQUIRED_KEYS: [&str; 3] = ["command", "user", "kill_port"];

/// Loads `target`, which is a service name (looked up in the config dir) or a path to a file.
pub fn load_service(dirs: &Dirs, target: &str) -> Result<Service, ConfigError> {
    let path = if target.contains('/') || target.ends_with(".yaml") {
        PathBuf::from(target)
    } else {
        dirs.service_file(target)
    };
    let name = service_name_from_path(&path)?;
    let read = trust::read_file(&path).map_err(|e| {
        if e.is_not_found() {
            ConfigError::NotFound { name: name.clone(), path: path.clone() }
        } else {
            ConfigError::Untrusted(e)
        }
    })?;
    // Reported with every other problem, so `validate` shows the whole picture; a file that is
    // not root's alone never becomes a Service.
    let mut untrusted: Vec<Problem> = trust::dirs_down_to(&dirs.config_dir, &path)
        .iter()
        .flat_map(|d| trust::check_dir(d))
        .chain(read.untrusted)
        .map(|e| Problem { line: None, key: String::new(), message: e.to_string() })
        .collect();
    let text = read.text;
    match parse(&path, &text).and_then(|file| validate(dirs, &name, &path, &text, file)) {
        Ok(service) if untrusted.is_empty() => Ok(service),
        Ok(_) => Err(ConfigError::Invalid { path, problems: untrusted }),
        Err(ConfigError::Invalid { path, problems }) => {
            untrusted.extend(problems);
            Err(ConfigError::Invalid { path, problems: untrusted })
        }
        Err(e) => Err(e),
    }
}

/// Loads the service called `name` from the config dir. The name is checked first, so no
/// command ever builds a path from `../x` or from a name that is really a path.
pub fn load_named(dirs: &Dirs, name: &str) -> Result<Service, ConfigError> {
    check_name(name)?;
    load_service(dirs, name)
}

/// Service names: `^[a-z0-9][a-z0-9_.-]{0,62}$` without `..`: safe as a file name, a unit
/// instance name and a path component.
pub fn check_name(name: &str) -> Result<(), ConfigError> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(&c))
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadName { name: name.to_string() })
    }
}

/// The whole path from text to a validated service, for the fuzz targets.
#[cfg(test)]
pub fn parse_and_validate_for_fuzzing(dirs: &Dirs, text: &str) -> Result<Service, ConfigError> {
    let path = Path::new("/nonexistent/fuzz.yaml");
    let file = parse(path, text)?;
    validate(dirs, "fuzz", path, text, file)
}

/// Every `*.yaml` file in the config dir, sorted by name.
pub fn discover(dirs: &Dirs) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = match std::fs::read_dir(&dirs.config_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ConfigError::ListDir { dir: dirs.config_dir.clone(), source }),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

pub fn service_name_from_path(path: &Path) -> Result<String, ConfigError> {
    let bad = || ConfigError::BadFileName { path: path.to_path_buf() };
    if path.extension().is_none_or(|x| x != "yaml") {
        return Err(bad());
    }
    let stem = path.file_stem().and_then(|s| s.to_str()).ok_or_else(bad)?;
    check_name(stem).map_err(|_| bad())?;
    Ok(stem.to_string())
}

fn parse(path: &Path, text: &str) -> Result<ServiceFile, ConfigError> {
    let invalid = |problems| ConfigError::Invalid { path: path.to_path_buf(), problems };
    let doc: Value = serde_yaml::from_str(text).map_err(|e| {
        invalid(vec![Problem {
            line: e.location().map(|l| l.line()),
            key: String::new(),
            message: format!("not valid YAML: {}", strip_location(&e.to_string())),
        }])
    })?;
    let problems = key_problems(text, &doc);
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.inner();
        let key_path: Vec<&str> = key.split('.').map(|k| k.split('[').next().unwrap_or(k)).collect();
        let line = inner.location().map(|l| l.line()).or_else(|| line_of(text, &key_path));
        invalid(vec![Problem {
            line,
            key: if key == "." { String::new() } else { key },
            message: strip_location(&inner.to_string()),
        }])
    })
}

/// Unknown keys and missing required keys, all of them, before typed parsing stops at the first.
fn key_problems(text: &str, doc: &Value) -> Vec<Problem> {
    let Value::Mapping(map) = doc else {
        let message = if doc.is_null() {
            "the file is empty; a service needs at least `command`, `user` and `kill_port`".to_string()
        } else {
            "the top level must be a mapping of keys (command, user, kill_port, ...)".to_string()
        };
        return vec![Problem { line: None, key: String::new(), message }];
    };
    let mut problems = Vec::new();
    unknown_keys(text, map, &[], TOP_LEVEL_KEYS, &mut problems);
    if let Some(Value::Mapping(criu)) = map.get("criu") {
        unknown_keys(text, criu, &["criu"], CRIU_KEYS, &mut problems);
    }
    for key in REQUIRED_KEYS {
        if !map.contains_key(key) {
            problems.push(Problem {
                line: None,
                key: key.to_string(),
                message: format!("required key is missing (see docs/configuration.md for `{key}`)"),
            });
        }
    }
    problems
}

fn unknown_keys(text: &str, map: &serde_yaml::Mapping, parent: &[&str], known: &[&str], out: &mut Vec<Problem>) {
    for key in map.keys() {
        let name = match key {
            Value::String(s) => s.clone(),
            other => serde_yaml::to_string(other).unwrap_or_default().trim().to_string(),
        };
        if known.contains(&name.as_str()) {
            continue;
        }
        let mut path: Vec<&str> = parent.to_vec();
        path.push(&name);
        let suggestion = closest(&name, known).map(|k| format!("; did you mean `{k}`?")).unwrap_or_default();
        out.push(Problem {
            line: line_of(text, &path),
            key: path.join("."),
            message: format!("unknown key{suggestion} (known keys here: {})", known.join(", ")),
        });
    }
}

/// A known key within edit distance 2, to catch typos such as `kill-port` or `usr`.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known.iter().map(|k| (edit_distance(name, k), *k)).filter(|(d, _)| *d <= 2).min().map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// serde_yaml appends " at line L column C"; the line is reported separately.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        match parse(Path::new("/x/s.yaml"), text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn reports_every_unknown_key_with_line_and_suggestion() {
        let p = problems("command: [a]\nuser: u\nkill-port: 1\ncriu:\n  confg: x\n");
        assert_eq!(p[0].key, "kill-port");
        assert_eq!(p[0].line, Some(3));
        assert!(p[0].message.contains("did you mean `kill_port`"), "{}", p[0].message);
        assert_eq!(p[1].key, "criu.confg");
        assert_eq!(p[1].line, Some(5));
        assert_eq!(p[2].key, "kill_port");
        assert!(p[2].message.contains("required"));
    }

    #[test]
    fn reports_syntax_errors_with_line() {
        let p = problems("command: [a\nuser: u\n");
        assert!(p[0].message.starts_with("not valid YAML"), "{}", p[0].message);
        assert!(p[0].line.is_some());
    }

    #[test]
    fn reports_type_errors_with_key_path() {
        let p = problems("command: [a]\nuser: u\nkill_port: 70000\n");
        assert_eq!(p[0].key, "kill_port");
        assert_eq!(p[0].line, Some(3));
    }

    #[test]
    fn names_come_from_file_names() {
        assert_eq!(service_name_from_path(Path::new("/e/redis.yaml")).unwrap(), "redis");
        assert!(service_name_from_path(Path::new("/e/Redis.yaml")).is_err());
        assert!(service_name_from_path(Path::new("/e/redis.yml")).is_err());
        assert!(service_name_from_path(Path::new("/e/a..b.yaml")).is_err());
        for bad in ["../../x", "a/b", "..", "a..b", "", "-x", "Redis", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["redis", "r0", "a.b-c_d", &"x".repeat(63)] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
    }
}
