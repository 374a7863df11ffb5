//! `ferry cluster ...`: status, membership, digests, leader transfer.

use ferry_sdk::Client;
use serde_json::json;

use crate::args::{ClientArgs, ClusterCmd};
use crate::client_cmd::{client, fail, print_json};

/// `ferry cluster ...`.
pub async fn cluster(args: &ClientArgs, cmd: ClusterCmd) -> u8 {
    let c = match client(args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match cmd {
        ClusterCmd::Status => status(&c, args.json).await,
        ClusterCmd::AddNode { id, addr, learner } => match c.add_node(id, &addr, learner).await {
            Ok(r) => {
                membership(args.json, &format!("added node {id} at {addr}"), r);
                0
            }
            Err(e) => fail(e),
        },
        ClusterCmd::RemoveNode { id } => match c.remove_node(id).await {
            Ok(r) => {
                membership(args.json, &format!("removed node {id}"), r);
                0
            }
            Err(e) => fail(e),
        },
        ClusterCmd::Digest => digest(&c, args.json).await,
        ClusterCmd::TransferLeader { to } => match c.transfer_leader(to).await {
            Ok(r) if args.json => {
                print_json(&json!({
                    "leader": r.leader_id, "leader_addr": r.leader_addr, "term": r.term, "took_ms": r.took_ms,
                }));
                0
            }
            Ok(r) => {
                println!("leader: {} ({})   term: {}   moved in {} ms", r.leader_id, r.leader_addr, r.term, r.took_ms);
                0
            }
            Err(e) if e.is_unimplemented() => {
                eprintln!(
                    "error: the leader runs a ferry older than 0.2.0, which cannot hand leadership over: stop it \
                     (SIGTERM) and the others elect a new leader"
                );
                1
            }
            Err(e) => fail(e),
        },
    }
}

/// `ferry cluster digest`: each member's own digest (no failover).
async fn digest(c: &Client, as_json: bool) -> u8 {
    let first = match c.status().await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut code = 0;
    let mut rows = Vec::new();
    for m in &first.members {
        rows.push(match c.state_digest_of(&m.addr).await {
            Ok(d) => json!({
                "id": m.id, "addr": m.addr, "applied_index": d.applied_index,
                "revision": d.revision, "keys": d.keys, "digest": d.digest,
            }),
            Err(e) => {
                code = 1;
                json!({"id": m.id, "addr": m.addr, "error": e.to_string()})
            }
        });
    }
    if as_json {
        print_json(&json!({"members": rows}));
        return code;
    }
    println!("{:<4} {:<22} {:>10} {:>10} {:>8}  DIGEST", "ID", "ADDR", "APPLIED", "REVISION", "KEYS");
    for r in &rows {
        let num = |k: &str| r.get(k).and_then(|v| v.as_u64()).map(|n| n.to_string()).unwrap_or_else(|| "-".into());
        let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        let digest = if r.get("error").is_some() { format!("unreachable: {}", s("error")) } else { s("digest") };
        println!(
            "{:<4} {:<22} {:>10} {:>10} {:>8}  {}",
            num("id"),
            s("addr"),
            num("applied_index"),
            num("revision"),
            num("keys"),
            digest
        );
    }
    code
}

fn membership(as_json: bool, what: &str, r: ferry_sdk::pb::MembershipResponse) {
    if as_json {
        let members: Vec<_> = r.members.iter().map(|m| json!({"id": m.id, "addr": m.addr, "kind": m.kind})).collect();
        print_json(&json!({"log_index": r.log_index, "members": members}));
    } else {
        println!("{what}");
        for m in r.members {
            println!("  {}  {}  {}", m.id, m.addr, m.kind);
        }
    }
}

async fn status(c: &Client, as_json: bool) -> u8 {
    let first = match c.status().await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    // Ask every member for its own view; an unreachable one shows as such.
    let mut rows = Vec::new();
    for m in &first.members {
        let row = match c.status_of(&m.addr).await {
            Ok(s) => json!({
                "id": m.id, "addr": m.addr, "kind": m.kind, "role": s.role,
                "term": s.term, "applied_index": s.applied_index, "commit_index": s.commit_index,
                "last_log_index": s.last_log_index, "snapshot_index": s.snapshot_index,
                "version": s.version, "tls_not_after": s.tls_not_after,
            }),
            Err(_) => json!({"id": m.id, "addr": m.addr, "kind": m.kind, "role": "unreachable"}),
        };
        rows.push(row);
    }
    let leader = if first.leader_id == 0 { serde_json::Value::Null } else { json!(first.leader_id) };
    // The leader's view of the lowest version among the members.
    let cluster_version = match rows.iter().find(|r| r["role"] == "leader") {
        Some(r) => {
            c.status_of(r["addr"].as_str().unwrap_or_default()).await.map(|s| s.cluster_version).unwrap_or_default()
        }
        None => String::new(),
    };
    if as_json {
        print_json(&json!({
            "leader": leader, "term": first.term, "revision": first.revision,
            "cluster_version": cluster_version, "members": rows,
        }));
    } else {
        match first.leader_id {
            0 => println!("leader: none known   term: {}   revision: {}", first.term, first.revision),
            id => println!("leader: {id}   term: {}   revision: {}", first.term, first.revision),
        }
        if !cluster_version.is_empty() {
            println!("cluster version: {cluster_version}");
        }
        println!(
            "{:<4} {:<22} {:<8} {:<12} {:>10} {:>10}  {:<8} CERT",
            "ID", "ADDR", "KIND", "ROLE", "APPLIED", "COMMIT", "VERSION"
        );
        let mut expiring = Vec::new();
        for r in rows {
            let cert = match r.get("tls_not_after").and_then(|v| v.as_i64()) {
                None => String::new(),
                Some(0) => "plaintext".to_string(),
                Some(at) => {
                    let days = (at - unix_now()).div_euclid(86_400);
                    if days < CERT_WARN_DAYS {
                        expiring.push((r["id"].clone(), days));
                    }
                    if days < 0 {
                        "expired".to_string()
                    } else {
                        format!("{days}d left")
                    }
                }
            };
            let num = |k: &str| r.get(k).and_then(|v| v.as_u64()).map(|n| n.to_string()).unwrap_or_else(|| "-".into());
            let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
            println!(
                "{:<4} {:<22} {:<8} {:<12} {:>10} {:>10}  {:<8} {}",
                num("id"),
                s("addr"),
                s("kind"),
                s("role"),
                num("applied_index"),
                num("commit_index"),
                s("version"),
                cert
            );
        }
        for (id, days) in expiring {
            println!(
                "warning: node {id}'s certificate expires in {days} days: rotate it (docs/operations/security.md)"
            );
        }
    }
    0
}

/// A member whose certificate expires in fewer days than this is named in
/// a warning under the table.
const CERT_WARN_DAYS: i64 = 30;

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}
