//! `ferry completions SHELL`: the shell completion script, generated from
//! the same clap definitions that parse the flags, so it never drifts.

use std::io::Write;

use clap::CommandFactory;

use crate::args::{Cli, Shell};

/// Prints the script for `shell` on stdout; 1 if stdout cannot be written.
pub fn run(shell: Shell) -> u8 {
    let generator = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    // Into a buffer first: the generator panics on a write error (`| head`).
    let mut script = Vec::new();
    clap_complete::generate(generator, &mut Cli::command(), "ferry", &mut script);
    let mut out = std::io::stdout().lock();
    match out.write_all(&script).and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("error: writing the completion script: {e}");
            1
        }
    }
}
