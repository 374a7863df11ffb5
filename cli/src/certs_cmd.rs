//! `ferry certs`: the cluster's certificate authority on the operator's
//! machine. `ca` makes one; `scheduler`, `worker` and `user` issue a
//! certificate naming its holder, signed by the CA in `--dir`.

use ferry_sdk::tls::authority::file_stem;
use ferry_sdk::tls::identity::valid_name;
use ferry_sdk::tls::{Authority, Identity};

use crate::args::{CertsCmd, CertsIssue, CertsOut};

/// Runs one `ferry certs` command: 0 done, 1 failed, 2 bad input.
pub fn run(cmd: CertsCmd) -> u8 {
    let (out, identity, issue) = match cmd {
        CertsCmd::Ca { out, name } => return make_ca(&out, &name),
        CertsCmd::Scheduler { out, id, issue } => (out, Identity::Scheduler(id), issue),
        CertsCmd::Worker { out, name, issue } => (out, Identity::Worker(name), issue),
        CertsCmd::User { out, name, issue } => (out, Identity::User(name), issue),
    };
    if let Identity::Worker(name) | Identity::User(name) = &identity {
        if !valid_name(name) {
            eprintln!("error: name: '{name}' must be 1 to 128 characters of letters, digits, '.', '-', '_' or '@'");
            return 2;
        }
    }
    issue_one(&out, &identity, &issue)
}

fn make_ca(out: &CertsOut, name: &str) -> u8 {
    let (cert, key) = (out.dir.join("ca.pem"), out.dir.join("ca-key.pem"));
    if cert.exists() || key.exists() {
        eprintln!(
            "error: dir: {} already holds a CA; a new one would orphan every certificate it issued (remove it first if you mean it)",
            out.dir.display()
        );
        return 2;
    }
    let made = std::fs::create_dir_all(&out.dir)
        .map_err(|e| format!("{}: {e}", out.dir.display()))
        .and_then(|()| Authority::new(name).map_err(|e| e.to_string()))
        .and_then(|ca| ca.write(&out.dir).map_err(|e| e.to_string()));
    match made {
        Ok(_) => {
            println!("wrote {} (give it to every scheduler, worker and user)", cert.display());
            println!("wrote {} (keep it secret: whoever holds it can issue certificates)", key.display());
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn issue_one(out: &CertsOut, identity: &Identity, issue: &CertsIssue) -> u8 {
    let ca = match Authority::load(&out.dir.join("ca.pem"), &out.dir.join("ca-key.pem")) {
        Ok(ca) => ca,
        Err(e) => {
            eprintln!(
                "error: dir: no CA in {}: {e} (make one with `ferry certs ca --dir {}`)",
                out.dir.display(),
                out.dir.display()
            );
            return 2;
        }
    };
    let now = time::OffsetDateTime::now_utc();
    let until = now + time::Duration::days(i64::from(issue.days));
    let issued = match ca.issue_between(identity, &issue.hosts, now - time::Duration::minutes(5), until) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let stem = file_stem(identity);
    let (cert, key) = (out.dir.join(format!("{stem}.pem")), out.dir.join(format!("{stem}-key.pem")));
    let written = ferry_sdk::tls::authority::write_file(&key, issued.key_pem.as_bytes(), true)
        .and_then(|()| ferry_sdk::tls::authority::write_file(&cert, issued.cert_pem.as_bytes(), false));
    if let Err(e) = written {
        eprintln!("error: {e}");
        return 1;
    }
    println!("wrote {} and {} for {identity}, valid until {}", cert.display(), key.display(), until.date());
    0
}
