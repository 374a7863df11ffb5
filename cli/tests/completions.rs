//! `ferry completions SHELL`: scripts for bash, zsh and fish that know the
//! subcommands; an unknown shell is a usage error (exit 2).

mod common;

use std::process::Command;

use common::*;

fn script(shell: &str) -> String {
    let out = ferry(&["completions", shell]);
    assert!(out.status.success(), "completions {shell}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("the script is UTF-8")
}

#[test]
fn every_shell_gets_a_script_naming_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let s = script(shell);
        for word in ["probe", "job", "config", "cluster", "completions", "submit", "endpoints", "json"] {
            assert!(s.contains(word), "the {shell} script does not mention {word}");
        }
    }
    assert!(script("zsh").starts_with("#compdef ferry"), "zsh loads it from $fpath by this line");
    assert!(script("fish").contains("complete -c ferry"));
}

#[test]
fn the_bash_script_registers_a_completion_for_ferry() {
    let path = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(path.path(), script("bash")).expect("write script");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p ferry", path.path().display()))
        .output()
        .expect("run bash");
    let registered = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "sourcing failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(registered.contains("ferry"), "`complete -p ferry` printed {registered:?}");
}

#[test]
fn an_unknown_shell_is_a_usage_error() {
    let out = ferry(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tcsh") && err.contains("bash"), "the error names the value and the choices: {err}");
}
