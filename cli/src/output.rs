//! Writing to stdout: one line at a time, a closed pipe ends a client
//! command quietly (`ferry config list | head -1`), and text that came from
//! users (keys, values, names, addresses) has its control characters escaped
//! so that it cannot fake a line or drive the terminal. `--json` output is
//! exact already.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static DAEMON: AtomicBool = AtomicBool::new(false);

/// This process is a daemon: a closed stdout must not stop it.
pub fn set_daemon() {
    DAEMON.store(true, Ordering::Relaxed);
}

/// Writes `bytes` to stdout. A client command whose reader went away
/// (`EPIPE`) exits with 0 at once: the reader has what it wanted.
pub fn write(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        if DAEMON.load(Ordering::Relaxed) {
            return;
        }
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// One line of text (what the crate's `println!` calls).
pub fn line(args: std::fmt::Arguments<'_>) {
    write(format!("{args}\n").as_bytes());
}

/// `text` with every control character (newline, escape, DEL, C1 ...)
/// written as a Rust-style escape (`\n`, `\u{1b}`), fit for one line of
/// text output.
pub fn escape(text: &str) -> Cow<'_, str> {
    escape_but(text, |_| false)
}

/// [`escape`], leaving the control characters `keep` says yes to.
fn escape_but(text: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    let escaped = |c: char| c.is_control() && !keep(c);
    if !text.chars().any(&escaped) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if escaped(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Bytes from users as escaped text (invalid UTF-8 shown as U+FFFD).
pub fn escape_bytes(bytes: &[u8]) -> String {
    escape(&String::from_utf8_lossy(bytes)).into_owned()
}

/// A value printed on its own (`config get`): as is into a pipe or a file,
/// so it round-trips byte for byte; on a terminal, with control characters
/// but newlines and tabs escaped, so a multi-line value still reads as
/// lines but cannot drive the terminal.
pub fn value(bytes: &[u8]) {
    if !std::io::stdout().is_terminal() {
        let mut all = bytes.to_vec();
        all.push(b'\n');
        return write(&all);
    }
    let text = String::from_utf8_lossy(bytes);
    let mut out = escape_but(&text, |c| c == '\n' || c == '\t').into_owned();
    out.push('\n');
    write(out.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_are_escaped_and_plain_text_is_left_alone() {
        assert_eq!(escape("app/limit"), "app/limit");
        assert_eq!(escape("naïve ключ"), "naïve ключ");
        assert_eq!(escape("a\nfake/key=spoofed"), "a\\nfake/key=spoofed");
        assert_eq!(escape("\u{1b}[2J\u{1b}]0;title\u{7}"), "\\u{1b}[2J\\u{1b}]0;title\\u{7}");
        assert_eq!(escape("tab\there\r"), "tab\\there\\r");
        assert_eq!(escape("\u{7f}\u{9b}"), "\\u{7f}\\u{9b}");
    }
}
