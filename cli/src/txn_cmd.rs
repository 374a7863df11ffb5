//! `ferry config txn`: compare-and-write on several keys, from flags.
//!
//! The flags map one to one onto `ConfigService/Txn`: `--if-mod-rev` and
//! `--if-absent` are its compares, `--put`/`--delete` its success writes and
//! `--else-put`/`--else-delete` its failure writes. clap keeps each flag's
//! values apart, so their relative order on the command line is lost; a key
//! may therefore be written only once per branch (and compared once), which
//! makes the order irrelevant. Within a branch, puts apply before deletes,
//! each at its own revision.

use ferry_sdk::{pb, Client};
use serde_json::json;

use crate::args::TxnArgs;
use crate::client_cmd::fail;

fn put(key: &str, value: &str) -> pb::TxnOp {
    pb::TxnOp {
        op: Some(pb::txn_op::Op::Put(pb::PutRequest {
            key: key.to_string(),
            value: value.as_bytes().to_vec(),
            ..Default::default()
        })),
    }
}

fn delete(key: &str) -> pb::TxnOp {
    pb::TxnOp { op: Some(pb::txn_op::Op::Delete(pb::DeleteRequest { key: key.to_string(), ..Default::default() })) }
}

/// The first key that appears twice in `keys`.
fn repeated<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut seen = std::collections::BTreeSet::new();
    keys.into_iter().find(|k| !seen.insert(*k))
}

/// The request the flags stand for, or what is wrong with them (naming the
/// flags).
pub(crate) fn request(args: &TxnArgs) -> Result<pb::TxnRequest, String> {
    let compared = args.if_mod_rev.iter().map(|(k, _)| k.as_str()).chain(args.if_absent.iter().map(String::as_str));
    if let Some(key) = repeated(compared) {
        return Err(format!("--if-mod-rev/--if-absent: key {key} is compared twice; give one compare per key"));
    }
    let written = args.put.iter().map(|(k, _)| k.as_str()).chain(args.delete.iter().map(String::as_str));
    if let Some(key) = repeated(written) {
        return Err(format!("--put/--delete: key {key} is written twice; give one write per key"));
    }
    let written = args.else_put.iter().map(|(k, _)| k.as_str()).chain(args.else_delete.iter().map(String::as_str));
    if let Some(key) = repeated(written) {
        return Err(format!("--else-put/--else-delete: key {key} is written twice; give one write per key"));
    }
    let has_compare = !args.if_mod_rev.is_empty() || !args.if_absent.is_empty();
    let has_else = !args.else_put.is_empty() || !args.else_delete.is_empty();
    if has_else && !has_compare {
        return Err("--else-put/--else-delete: need a compare (--if-mod-rev or --if-absent); \
                    without one the --put/--delete writes always apply"
            .into());
    }
    if !has_compare && args.put.is_empty() && args.delete.is_empty() {
        return Err("give at least one of --if-mod-rev, --if-absent, --put, --delete".into());
    }
    let compares = args
        .if_mod_rev
        .iter()
        .map(|(key, rev)| pb::Compare {
            key: key.clone(),
            target: Some(match rev {
                0 => pb::compare::Target::Absent(true),
                rev => pb::compare::Target::ModRevision(*rev),
            }),
        })
        .chain(
            args.if_absent
                .iter()
                .map(|key| pb::Compare { key: key.clone(), target: Some(pb::compare::Target::Absent(true)) }),
        )
        .collect();
    let success = args.put.iter().map(|(k, v)| put(k, v)).chain(args.delete.iter().map(|k| delete(k))).collect();
    let failure =
        args.else_put.iter().map(|(k, v)| put(k, v)).chain(args.else_delete.iter().map(|k| delete(k))).collect();
    Ok(pb::TxnRequest { compares, success, failure, request_id: String::new() })
}

/// Runs the transaction and prints its outcome; the exit code: 0 when the
/// compares held, 1 when one did not, 2 for bad input.
pub async fn run(c: &Client, args: &TxnArgs, json_out: bool) -> u8 {
    let req = match request(args) {
        Ok(r) => r,
        Err(reason) => {
            eprintln!("error: {reason}");
            return 2;
        }
    };
    let has_else = !req.failure.is_empty();
    let resp = match c.txn(req).await {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let revision = resp.header.as_ref().map_or(0, |h| h.revision);
    if json_out {
        let mut out = json!({"succeeded": resp.succeeded, "revision": revision});
        if !resp.succeeded {
            out["failed"] = json!(resp.failed);
        }
        println!("{out}");
    } else if resp.succeeded {
        println!("OK revision {revision}");
    } else if has_else {
        println!("else writes applied, revision {revision}");
    }
    if resp.succeeded {
        0
    } else {
        eprintln!("not applied: {}", resp.failed);
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(argv: &[&str]) -> TxnArgs {
        use clap::Parser;
        let mut all = vec!["ferry", "config", "txn"];
        all.extend_from_slice(argv);
        match crate::args::Cli::try_parse_from(all).expect("parses").command {
            crate::args::Command::Config(crate::args::ConfigCmd::Txn(t)) => *t,
            other => panic!("not a txn: {other:?}"),
        }
    }

    fn parse_error(argv: &[&str]) -> String {
        use clap::Parser;
        let mut all = vec!["ferry", "config", "txn"];
        all.extend_from_slice(argv);
        crate::args::Cli::try_parse_from(all).expect_err("refused").to_string()
    }

    #[test]
    fn flags_map_onto_compares_and_both_branches() {
        let req = request(&args(&[
            "--if-mod-rev",
            "a=7",
            "--if-absent",
            "lock",
            "--if-mod-rev",
            "b=0",
            "--put",
            "a=x=y",
            "--delete",
            "old",
            "--else-put",
            "conflicts=1",
        ]))
        .expect("valid");
        let targets: Vec<_> = req.compares.iter().map(|c| (c.key.as_str(), c.target)).collect();
        assert_eq!(
            targets,
            [
                ("a", Some(pb::compare::Target::ModRevision(7))),
                ("b", Some(pb::compare::Target::Absent(true))),
                ("lock", Some(pb::compare::Target::Absent(true))),
            ]
        );
        match (&req.success[0].op, &req.success[1].op) {
            (Some(pb::txn_op::Op::Put(p)), Some(pb::txn_op::Op::Delete(d))) => {
                assert_eq!((p.key.as_str(), p.value.as_slice()), ("a", b"x=y".as_slice()));
                assert_eq!(d.key, "old");
            }
            other => panic!("unexpected success ops {other:?}"),
        }
        assert!(matches!(&req.failure[0].op, Some(pb::txn_op::Op::Put(p)) if p.key == "conflicts"));
    }

    #[test]
    fn bad_flags_are_refused_naming_the_flag() {
        assert!(parse_error(&["--put", "novalue"]).contains("--put"));
        assert!(parse_error(&["--put", "=v"]).contains("empty key"));
        assert!(parse_error(&["--if-mod-rev", "a=x"]).contains("--if-mod-rev"));
        assert!(parse_error(&["--if-absent", ""]).contains("--if-absent"));
        let err = |argv: &[&str]| request(&args(argv)).expect_err("refused");
        assert!(err(&[]).contains("at least one"));
        assert!(err(&["--put", "a=1", "--delete", "a"]).starts_with("--put/--delete: key a"));
        assert!(err(&["--if-absent", "a", "--if-mod-rev", "a=3", "--put", "b=1"]).contains("compared twice"));
        assert!(err(&["--put", "a=1", "--else-put", "b=1"]).contains("need a compare"));
        assert!(err(&["--if-absent", "a", "--else-put", "b=1", "--else-delete", "b"]).starts_with("--else-put"));
    }
}
