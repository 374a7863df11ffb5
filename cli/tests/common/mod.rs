//! Helpers for tests that start real `ferry` processes: free ports, child
//! processes killed on drop, and waiting on conditions with deadlines.
//!
//! Everything runs under mutual TLS, as a real install does: each test
//! binary makes one CA ([`test_ca`]); a scheduler or worker started through
//! [`Proc`] gets a certificate naming it, and client commands ([`ferry`],
//! [`command`]) and clients ([`client`], [`security`]) a user's, through
//! the same `FERRY_TLS_*` variables a user exports.

#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferry_sdk::tls::{Authority, Credentials, Files, Identity};
use ferry_sdk::{Client, ClientOptions, Security};

/// The binary under test.
pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// This test binary's CA and the certificates issued so far (each identity
/// once: tests run in parallel and must not rewrite each other's files).
pub struct TestCa {
    pub dir: PathBuf,
    pub ca: Authority,
    issued: Mutex<HashMap<Identity, Files>>,
}

/// The CA of this test binary (made on first use, in a directory left for
/// inspection under the system's temporary directory).
pub fn test_ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("ferry-test-ca").tempdir().expect("CA dir").keep();
        let ca = Authority::new("test").expect("CA");
        ca.write(&dir).expect("write the CA");
        TestCa { dir, ca, issued: Mutex::new(HashMap::new()) }
    })
}

/// The certificate files of `identity` from [`test_ca`].
pub fn files(identity: &Identity) -> Files {
    let ca = test_ca();
    let mut issued = ca.issued.lock().unwrap();
    issued
        .entry(identity.clone())
        .or_insert_with(|| {
            ca.ca.write_holder(&ca.dir, identity, &["127.0.0.1".into(), "localhost".into()]).expect("issue")
        })
        .clone()
}

/// Issues `identity` a new certificate and key in place of its files (a
/// rotation): the files keep their names.
pub fn reissue(identity: &Identity) -> Files {
    let ca = test_ca();
    let mut issued = ca.issued.lock().unwrap();
    let files = ca.ca.write_holder(&ca.dir, identity, &["127.0.0.1".into(), "localhost".into()]).expect("reissue");
    issued.insert(identity.clone(), files.clone());
    files
}

/// Like [`reissue`], with a certificate valid for `days` from now.
pub fn reissue_for(identity: &Identity, days: i64) -> Files {
    let files = reissue(identity);
    let now = time::OffsetDateTime::now_utc();
    let issued = test_ca()
        .ca
        .issue_between(
            identity,
            &["127.0.0.1".into(), "localhost".into()],
            now - time::Duration::minutes(5),
            now + time::Duration::days(days),
        )
        .expect("issue");
    ferry_sdk::tls::authority::write_file(&files.key, issued.key_pem.as_bytes(), true).expect("key");
    ferry_sdk::tls::authority::write_file(&files.cert, issued.cert_pem.as_bytes(), false).expect("cert");
    files
}

/// The flags giving a daemon `identity`'s certificate.
pub fn tls_flags(identity: &Identity) -> Vec<std::ffi::OsString> {
    files(identity).flags()
}

/// The tests' user.
pub fn user() -> Identity {
    Identity::User("test".into())
}

/// The variables a user exports for the CLI (`ferry dev` prints them).
pub fn user_env() -> Vec<(&'static str, std::ffi::OsString)> {
    files(&user()).env()
}

/// The tests' user's credentials, for SDK clients.
pub fn security() -> Security {
    Security::Tls(Credentials::load(files(&user())).expect("credentials"))
}

/// `ferry` with the user's credentials in its environment.
pub fn command() -> Command {
    let mut cmd = Command::new(FERRY);
    cmd.envs(user_env());
    cmd
}

/// `ferry ARGS`, secured as [`Proc::spawn`] secures it: a scheduler or
/// worker with its own certificate, anything else with the user's.
pub fn command_for<S: AsRef<str>>(args: &[S]) -> Command {
    let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
    let mut cmd = Command::new(FERRY);
    cmd.args(&args);
    match daemon_identity(&args) {
        Some(me) => cmd.args(tls_flags(&me)),
        None => cmd.envs(user_env()),
    };
    cmd
}

/// The value of flag `name` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

/// The identity a daemon started with `args` runs as, unless the flags
/// already say how it is secured.
fn daemon_identity(args: &[String]) -> Option<Identity> {
    if args.iter().any(|a| a == "--insecure" || a == "--tls-ca") {
        return None;
    }
    match args.first().map(String::as_str) {
        Some("scheduler") => Some(Identity::Scheduler(flag(args, "--id").and_then(|v| v.parse().ok()).unwrap_or(1))),
        Some("worker") if args.get(1).is_some_and(|a| a.starts_with("--")) => {
            flag(args, "--name").map(|n| Identity::Worker(n.to_string()))
        }
        _ => None,
    }
}

/// A port that was free a moment ago.
///
/// Ports come from 20000-31999, below the kernel's ephemeral range (32768 and
/// up by default), so no outgoing connection and no port-0 listener (another
/// test's worker or client) can take one between this check and the moment
/// the process under test binds it. A counter keeps the tests of one binary
/// apart; the process id spreads test binaries over the range.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let port = LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        let port = u16::try_from(port).expect("port range fits in u16");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}-{}", LOW + SPAN - 1)
}

/// A metric's value from an admin `/metrics` endpoint (`None` if absent).
pub fn metric(admin: &str, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// Runs `ferry ARGS` to completion, secured as [`command_for`] secures it.
pub fn ferry(args: &[&str]) -> std::process::Output {
    command_for(args).output().expect("run ferry")
}

/// `ferry --endpoints ENDPOINTS ARGS`: its exit code (-1 if killed) and its
/// stdout followed by its stderr.
pub fn ferry_at(endpoints: &str, args: &[&str]) -> (i32, String) {
    let out = ferry(&[&["--endpoints", endpoints], args].concat());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// A child `ferry` process with its stderr in a log file; SIGKILLed on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `ferry ARGS`, logging to `log`.
    pub fn spawn(args: &[String], log: &Path) -> Self {
        Self::spawn_with_env(args, log, &[])
    }

    /// Starts `ferry ARGS` with `env` set, logging to `log`. A scheduler
    /// or worker gets its own certificate (unless `args` say otherwise),
    /// anything else the user's.
    pub fn spawn_with_env(args: &[String], log: &Path, env: &[(&str, &str)]) -> Self {
        let file = std::fs::File::create(log).expect("log file");
        let child = command_for(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn ferry");
        Self { child: Some(child), log: log.to_path_buf() }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits up to `timeout` for `child` to exit: its exit code, or `None` if
/// it still runs.
pub fn exit_code_within(child: &mut Child, timeout: Duration) -> Option<Option<i32>> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status.code());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A client with a generous deadline.
pub fn client(addrs: Vec<String>) -> Client {
    let options =
        ClientOptions { total_timeout: Duration::from_secs(20), security: Some(security()), ..Default::default() };
    Client::with_options(addrs, options).expect("client")
}

/// Three scheduler processes on fresh ports.
pub struct Schedulers {
    pub ids: Vec<u64>,
    pub addrs: Vec<String>,
    pub admins: Vec<String>,
    pub data: Vec<PathBuf>,
    pub procs: Vec<Proc>,
    pub members: String,
    pub extra: Vec<String>,
}

impl Schedulers {
    /// Starts three nodes under `dir` with `extra` flags each.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let ids = vec![1, 2, 3];
        let addrs: Vec<String> = ids.iter().map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let admins: Vec<String> = ids.iter().map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let data: Vec<PathBuf> = ids.iter().map(|id| dir.join(format!("s{id}"))).collect();
        let members = ids.iter().zip(&addrs).map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",");
        let mut s = Self {
            ids,
            addrs,
            admins,
            data,
            procs: Vec::new(),
            members,
            extra: extra.iter().map(|e| e.to_string()).collect(),
        };
        for i in 0..3 {
            let p = s.spawn(i);
            s.procs.push(p);
        }
        s
    }

    fn spawn(&self, i: usize) -> Proc {
        let mut args: Vec<String> = vec![
            "scheduler".into(),
            "--id".into(),
            self.ids[i].to_string(),
            "--listen".into(),
            self.addrs[i].clone(),
            "--admin-listen".into(),
            self.admins[i].clone(),
            "--data".into(),
            self.data[i].display().to_string(),
            "--initial-cluster".into(),
            self.members.clone(),
        ];
        args.extend(self.extra.iter().cloned());
        Proc::spawn(&args, &self.data[i].with_extension("log"))
    }

    /// Restarts node `id` on its data directory.
    pub fn restart(&mut self, id: u64) {
        let i = (id - 1) as usize;
        self.procs[i] = self.spawn(i);
    }

    /// SIGKILLs node `id`.
    pub fn kill9(&mut self, id: u64) {
        self.procs[(id - 1) as usize].kill9();
    }

    /// SIGTERMs node `id` and waits up to `timeout` for it to exit; its
    /// exit status, or `None` if it is still running (then it is killed).
    pub fn terminate(&mut self, id: u64, timeout: Duration) -> Option<std::process::ExitStatus> {
        let proc = &mut self.procs[(id - 1) as usize];
        let child = proc.child.as_mut()?;
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().is_ok_and(|s| s.success());
        assert!(sent, "kill -TERM {pid}");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                proc.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        proc.kill9();
        None
    }

    /// The address of node `id`.
    pub fn addr(&self, id: u64) -> String {
        self.addrs[(id - 1) as usize].clone()
    }

    /// A client for the nodes in `ids`.
    pub fn client(&self, ids: &[u64]) -> Client {
        client(ids.iter().map(|id| self.addr(*id)).collect())
    }

    /// Tails of every node's log (for failure messages).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, p) in self.procs.iter().enumerate() {
            let text = p.log_text();
            let tail: Vec<_> = text.lines().rev().take(15).collect();
            out += &format!("--- scheduler {} ---\n{}\n", i + 1, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        out
    }

    /// Waits until every node in `ids` agrees on a leader among `ids`.
    pub async fn agreed_leader(&self, ids: &[u64]) -> u64 {
        let c = self.client(ids);
        let addrs: Vec<String> = ids.iter().map(|id| self.addr(*id)).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut seen = Vec::new();
            for a in &addrs {
                seen.push(c.status_of(a).await.map(|s| (s.leader_id, s.term)).map_err(|e| e.to_string()));
            }
            let leaders: Vec<u64> = seen.iter().filter_map(|s| s.as_ref().ok().map(|s| s.0)).collect();
            if leaders.len() == addrs.len() && leaders.iter().all(|l| *l == leaders[0] && ids.contains(l)) {
                return leaders[0];
            }
            assert!(Instant::now() < deadline, "no agreed leader; last seen (leader, term): {seen:?}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A worker process with its own root.
pub struct WorkerProc {
    pub name: String,
    pub root: PathBuf,
    pub proc: Proc,
    pub args: Vec<String>,
}

impl WorkerProc {
    /// Starts worker `name` under `dir` against `schedulers`, with `extra` flags.
    pub fn start(dir: &Path, name: &str, schedulers: &[String], extra: &[&str]) -> Self {
        Self::start_with_env(dir, name, schedulers, extra, &[])
    }

    /// [`WorkerProc::start`] with `env` set (e.g. `FAILPOINTS`, which
    /// arms the fail points of the test build).
    pub fn start_with_env(dir: &Path, name: &str, schedulers: &[String], extra: &[&str], env: &[(&str, &str)]) -> Self {
        let root = dir.join(format!("{name}-root"));
        std::fs::create_dir_all(&root).expect("root");
        std::fs::create_dir_all(dir.join(name)).expect("hook log dir");
        let root = root.canonicalize().expect("canonical root");
        let mut args: Vec<String> = vec![
            "worker".into(),
            "--name".into(),
            name.into(),
            // Port 0: the worker advertises the port it got (no race).
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--schedulers".into(),
            schedulers.join(","),
            "--data".into(),
            dir.join(format!("{name}-data")).display().to_string(),
            "--allow-root".into(),
            root.display().to_string(),
            "--hook".into(),
            format!("reload=echo $FERRY_JOB_ID >> {}/hook.log", dir.join(name).display()),
        ];
        args.extend(extra.iter().map(|e| e.to_string()));
        let proc = Proc::spawn_with_env(&args, &dir.join(format!("{name}.log")), env);
        Self { name: name.into(), root, proc, args }
    }

    /// Starts it again with the same flags.
    pub fn restart(&mut self) {
        self.proc = Proc::spawn(&self.args, &self.proc.log.clone());
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// True if `value` is a registry instance (stored as a JSON object) marked
/// `deregistered`: the write an explicit deregistration leaves in the
/// key's history.
pub fn marked_deregistered(value: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(value).is_ok_and(|i| i["deregistered"] == true)
}

/// Waits until the cluster lists every worker in `names` as up.
pub async fn workers_up(c: &Client, names: &[&str]) {
    wait_for("workers up", Duration::from_secs(20), || async {
        let list = c.list_workers().await.ok()?;
        let up =
            names.iter().all(|n| list.iter().any(|w| w.state == "up" && w.info.as_ref().is_some_and(|i| i.name == *n)));
        up.then_some(())
    })
    .await
}
