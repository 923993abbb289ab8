//! Printing for humans or, with --json, for scripts (one JSON document on stdout).

pub fn print_json<T: serde::Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("serializable"));
}
