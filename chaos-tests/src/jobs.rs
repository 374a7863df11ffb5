//! The job workload and its checker: one job after another from worker
//! `w1` to every other worker, each a new version of a set of files (a few
//! small edits of the last one, so most chunks are reused: a delta update;
//! in the scenarios' [`Shape::CHAOS`] every fourth an odd small size), while
//! a sampler reads the targets' final paths.
//!
//! What must hold (issue 25's job checker):
//! - a job acknowledged at submit is found at once by every member that
//!   answers;
//! - every job ends, and each target is either installed with a file
//!   byte-identical to the source's or failed (or cancelled) with a reason;
//! - a final path never holds anything but the whole file (the sampler),
//!   and an installed file is still whole after the next job (whatever the
//!   nemesis did to its worker meanwhile);
//! - no staging file is left once the job has ended and every worker is
//!   back.
//!
//! Job `k` writes `src/f<k>-<i>.bin` (file `i` of its set) on the source
//! and installs them as `j<k>/f<k>-<i>.bin` under each target's root, so a
//! job whose submit had no answer (and may still run) cannot touch another
//! job's files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_sdk::{pb, Client, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cluster::WorkerDirs;

/// One job as the workload saw it.
#[derive(Debug, Clone, Serialize)]
pub struct JobRun {
    pub k: usize,
    /// Seconds since the run started, at submit.
    pub at: f64,
    /// Bytes of all its files.
    pub size: usize,
    /// Each file's BLAKE3.
    pub blake3: Vec<String>,
    /// Set when the submit was acknowledged.
    pub job_id: Option<String>,
    /// Why the submit got no id (refused, or no answer).
    pub submit_error: Option<String>,
    /// The job's final state, and each target's (worker, state, reason).
    pub state: String,
    pub targets: Vec<(String, String, String)>,
    /// Bytes the targets already held (delta) and bytes moved.
    pub reused: u64,
    pub moved: u64,
}

/// What the job workload did and found.
#[derive(Debug, Default)]
pub struct Jobs {
    pub runs: Vec<JobRun>,
    pub problems: Vec<String>,
    /// What the report adds under the jobs' line (what a fault did).
    pub notes: Vec<String>,
}

impl Jobs {
    /// Jobs acknowledged, succeeded, and targets installed / failed with a
    /// reason.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let acked = self.runs.iter().filter(|r| r.job_id.is_some()).count();
        let succeeded = self.runs.iter().filter(|r| r.state == "succeeded").count();
        let targets = self.runs.iter().flat_map(|r| &r.targets);
        let installed = targets.clone().filter(|(_, s, _)| s == "installed" || s == "unchanged").count();
        (acked, succeeded, installed, targets.count() - installed)
    }
}

/// What the jobs carry and how often they go.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Files per job.
    pub files: usize,
    /// Bytes of each file (about: the edits change it a little).
    pub bytes: usize,
    /// Every fourth job carries odd small sizes instead (1 B, 4097 B, ...).
    pub odd_sizes: bool,
    /// The least time from one submit to the next (zero: the next job goes
    /// as soon as the last ended).
    pub pace: Duration,
}

impl Shape {
    /// The scenarios': one ~2 MB file, odd sizes, back to back.
    pub const CHAOS: Shape = Shape { files: 1, bytes: 2_000_000, odd_sizes: true, pace: Duration::ZERO };
}

/// A job's files as the source wrote them: (hash, size) of each.
type Version = Vec<(blake3::Hash, usize)>;

/// The files the current job installs, for the sampler.
type Current = Arc<Mutex<Option<(usize, Version)>>>;

fn install_path(root: &Path, k: usize, i: usize) -> PathBuf {
    root.join(format!("j{k}")).join(format!("f{k}-{i}.bin"))
}

/// A few edits of `data`: overwritten ranges, an insertion, a trimmed or
/// grown tail.
fn edit(data: &mut Vec<u8>, rng: &mut StdRng) {
    for _ in 0..rng.gen_range(1..4) {
        let at = rng.gen_range(0..data.len());
        let end = (at + rng.gen_range(1..4096)).min(data.len());
        rng.fill(&mut data[at..end]);
    }
    if rng.gen_bool(0.5) {
        let at = rng.gen_range(0..data.len());
        let insert: Vec<u8> = (0..rng.gen_range(1..2000)).map(|_| rng.gen()).collect();
        data.splice(at..at, insert);
    }
    let len = data.len() as i64 + rng.gen_range(-3000i64..3000);
    data.resize(len.max(1) as usize, 7);
}

/// Starts the job loop and the sampler; both stop when `stop` is set (the
/// job in flight is followed to its end first).
pub fn start(
    endpoints: Vec<String>,
    workers: &[WorkerDirs],
    shape: Shape,
    seed: u64,
    started: Instant,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Jobs> {
    let source = (workers[0].name.clone(), workers[0].root.clone());
    let targets: Vec<(String, PathBuf)> = workers[1..].iter().map(|w| (w.name.clone(), w.root.clone())).collect();
    let current: Current = Arc::default();
    let sampler_stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::task::spawn_blocking({
        let (targets, current, stop) = (targets.clone(), current.clone(), sampler_stop.clone());
        move || sample(&targets, &current, &stop)
    });
    tokio::spawn(async move {
        let mut jobs = job_loop(endpoints, source, targets, shape, seed, started, stop, current).await;
        sampler_stop.store(true, Ordering::Relaxed);
        match sampler.await {
            Ok(problems) => jobs.problems.extend(problems),
            Err(e) => jobs.problems.push(format!("the sampler died: {e}")),
        }
        jobs
    })
}

/// Reads the current job's final path on every target until `stop`: a
/// file there must be the whole new version.
fn sample(targets: &[(String, PathBuf)], current: &Current, stop: &AtomicBool) -> Vec<String> {
    let mut problems = Vec::new();
    while !stop.load(Ordering::Relaxed) && problems.len() < 10 {
        std::thread::sleep(Duration::from_millis(200));
        let Some((k, version)) = current.lock().unwrap_or_else(|e| e.into_inner()).clone() else { continue };
        for (name, root) in targets {
            for (i, (hash, size)) in version.iter().enumerate() {
                let Ok(bytes) = std::fs::read(install_path(root, k, i)) else { continue };
                if blake3::hash(&bytes) != *hash {
                    problems.push(format!(
                        "job {k}: {name}'s final path of file {i} held {} bytes that are not the {size} bytes of the \
                         source",
                        bytes.len()
                    ));
                }
            }
        }
    }
    problems
}

#[allow(clippy::too_many_arguments)]
async fn job_loop(
    endpoints: Vec<String>,
    (source, source_root): (String, PathBuf),
    targets: Vec<(String, PathBuf)>,
    shape: Shape,
    seed: u64,
    started: Instant,
    stop: Arc<AtomicBool>,
    current: Current,
) -> Jobs {
    let mut jobs = Jobs::default();
    let client = match crate::workload::client(&endpoints) {
        Ok(c) => c,
        Err(e) => {
            jobs.problems.push(format!("no client: {e}"));
            return jobs;
        }
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut big: Vec<Vec<u8>> = (0..shape.files)
        .map(|_| (0..shape.bytes + rng.gen_range(0..shape.bytes / 20 + 1)).map(|_| rng.gen()).collect())
        .collect();
    let src_dir = source_root.join("src");
    if let Err(e) = std::fs::create_dir_all(&src_dir) {
        jobs.problems.push(format!("creating {}: {e}", src_dir.display()));
        return jobs;
    }
    let mut k = 0;
    // The last finished job's hash and the targets that installed it.
    let mut previous: Option<(usize, Version, Vec<String>)> = None;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let submitted = Instant::now();
        let mut version = Version::new();
        let mut paths = Vec::new();
        for (i, big) in big.iter_mut().enumerate() {
            let data = if shape.odd_sizes && k % 4 == 0 {
                let size = [1usize, 4097, 65_537, 1_048_577][rng.gen_range(0..4)];
                (0..size).map(|_| rng.gen()).collect()
            } else {
                edit(big, &mut rng);
                big.clone()
            };
            let path = src_dir.join(format!("f{k}-{i}.bin"));
            let tmp = src_dir.join(format!(".f{k}-{i}.tmp"));
            if let Err(e) = std::fs::write(&tmp, &data).and_then(|()| std::fs::rename(&tmp, &path)) {
                jobs.problems.push(format!("writing {}: {e}", path.display()));
                return jobs;
            }
            version.push((blake3::hash(&data), data.len()));
            paths.push(path);
        }
        let mut run = JobRun {
            k,
            at: started.elapsed().as_secs_f64(),
            size: version.iter().map(|(_, size)| size).sum(),
            blake3: version.iter().map(|(hash, _)| hash.to_hex().to_string()).collect(),
            job_id: None,
            submit_error: None,
            state: String::new(),
            targets: Vec::new(),
            reused: 0,
            moved: 0,
        };
        let spec = pb::JobSpec {
            source: source.clone(),
            files: paths.iter().map(|p| p.to_string_lossy().into_owned()).collect(),
            targets: targets.iter().map(|(name, _)| name.clone()).collect(),
            destination: format!("j{k}/"),
            hook: "reload".into(),
            timeout_ms: 60_000,
            grace_ms: 10_000,
            ..Default::default()
        };
        *current.lock().unwrap_or_else(|e| e.into_inner()) = Some((k, version.clone()));
        match client.submit_job(spec, false).await {
            Ok(resp) => run.job_id = Some(resp.job_id),
            Err(e) => {
                run.submit_error = Some(e.to_string());
                if matches!(&e, Error::Rejected(s) if s.code() == tonic::Code::InvalidArgument) {
                    jobs.problems.push(format!("job {k}: refused as bad input: {e}"));
                }
                // The source is restarting, say: do not spin.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if let Some(id) = run.job_id.clone() {
            check_visible(&endpoints, &id, k, &mut jobs.problems).await;
            follow(&client, &id, &mut run, &mut jobs.problems).await;
            check_targets(&run, &targets, &version, &mut jobs.problems);
            if let Some((before, version, installed)) = previous.take() {
                check_kept(before, &version, &installed, &targets, &mut jobs.problems);
            }
            let installed = run.targets.iter().filter(|(_, s, _)| s == "installed" || s == "unchanged");
            previous = Some((k, version, installed.map(|(w, _, _)| w.clone()).collect()));
            // Keep the last job's files (the next one reuses their chunks).
            for (_, root) in &targets {
                let _ = std::fs::remove_dir_all(root.join(format!("j{}", k.saturating_sub(2))));
            }
        }
        *current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        paths.iter().for_each(|path| drop(std::fs::remove_file(path)));
        jobs.runs.push(run);
        while submitted.elapsed() < shape.pace && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    jobs
}

/// Every member that answers must know job `id` just acknowledged.
async fn check_visible(endpoints: &[String], id: &str, k: usize, problems: &mut Vec<String>) {
    for addr in endpoints {
        let Ok(one) = crate::workload::connect([addr.clone()]) else { continue };
        match tokio::time::timeout(Duration::from_secs(3), one.get_job(id)).await {
            Ok(Err(Error::Rejected(s))) if s.code() == tonic::Code::NotFound => {
                problems.push(format!("job {k} ({id}): acknowledged, but {addr} answered {}", s.message()));
            }
            // Down, cut off or electing: no answer is not a wrong answer.
            _ => {}
        }
    }
}

/// Polls the job until it ends (or far past its own deadline).
async fn follow(client: &Client, id: &str, run: &mut JobRun, problems: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(report) = client.get_job(id).await {
            if report.state != "running" {
                run.state = report.state.clone();
                for t in &report.targets {
                    run.targets.push((t.worker.clone(), t.state.clone(), t.reason.clone()));
                    run.reused += t.bytes_reused;
                    run.moved += t.bytes_from_source + t.bytes_from_peers;
                }
                return;
            }
        }
        if Instant::now() > deadline {
            problems.push(format!("job {} ({id}): still running 120 s after submit (its timeout is 60 s)", run.k));
            run.state = "running".into();
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each target installed the exact bytes, or failed with a reason.
fn check_targets(run: &JobRun, targets: &[(String, PathBuf)], version: &Version, problems: &mut Vec<String>) {
    let k = run.k;
    for (name, state, reason) in &run.targets {
        match state.as_str() {
            "installed" | "unchanged" => {
                let Some((_, root)) = targets.iter().find(|(n, _)| n == name) else { continue };
                for (i, (hash, size)) in version.iter().enumerate() {
                    if let Some(wrong) = not_whole(&install_path(root, k, i), *hash) {
                        problems.push(format!("job {k}: {name} reported {state}, but {wrong} (source: {size} bytes)"));
                    }
                }
            }
            "failed" | "cancelled" if !reason.is_empty() => {}
            other => problems.push(format!("job {k}: {name} ended {other:?} with reason {reason:?}")),
        }
    }
    if run.state != "running" && run.targets.len() != targets.len() {
        problems.push(format!("job {k}: the report names {} targets of {}", run.targets.len(), targets.len()));
    }
}

/// The files of job `k`, installed by `installed`, are still whole one job
/// later (after whatever the nemesis did meanwhile: a power cut of the
/// target, say).
fn check_kept(
    k: usize,
    version: &Version,
    installed: &[String],
    targets: &[(String, PathBuf)],
    problems: &mut Vec<String>,
) {
    for (name, root) in targets.iter().filter(|(name, _)| installed.contains(name)) {
        for (i, (hash, _)) in version.iter().enumerate() {
            if let Some(wrong) = not_whole(&install_path(root, k, i), *hash) {
                problems.push(format!("job {k}: {name} had installed it, and now {wrong}"));
            }
        }
    }
}

/// What is wrong with the file at `path`, if it is not the bytes of `hash`.
fn not_whole(path: &Path, hash: blake3::Hash) -> Option<String> {
    match std::fs::read(path) {
        Ok(bytes) if blake3::hash(&bytes) == hash => None,
        Ok(bytes) => Some(format!("{} holds {} other bytes", path.display(), bytes.len())),
        Err(e) => Some(format!("{}: {e}", path.display())),
    }
}

/// Staging files (`.<name>.ferry-<job>.part`, `.<name>.ferry-tmp`) under
/// the targets' roots: none may be left once the jobs ended and every
/// worker is back.
pub fn staging_left(workers: &[WorkerDirs]) -> Vec<String> {
    let mut out = Vec::new();
    for w in workers {
        let mut dirs = vec![w.root.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if path.is_dir() {
                    dirs.push(path);
                } else if name.starts_with('.') && name.contains(".ferry-") {
                    out.push(format!("{}: staging file left: {}", w.name, path.display()));
                }
            }
        }
    }
    out
}

/// How many finished jobs the cluster keeps, as far as the checks know.
#[derive(Debug, Clone, Copy)]
pub enum Kept {
    /// Every job (the default history outlasts any run).
    All,
    /// At least the newest `n`; older ones may be forgotten (a mixed
    /// cluster: only a leader of the release with the short history forgets).
    AtLeast(usize),
    /// The newest `n`, and the oldest must be gone by the end.
    Newest(usize),
}

/// After the run, with every process back: every member lists every
/// acknowledged job the history keeps (see [`Kept`]), and no staging file
/// is left.
pub async fn final_check(endpoints: &[String], jobs: &Jobs, workers: &[WorkerDirs], kept: Kept) -> Vec<String> {
    let mut problems = staging_left(workers);
    // With a bounded history, only the newest jobs must still be listed
    // (the workload runs one job at a time).
    let acknowledged: Vec<&JobRun> = jobs.runs.iter().filter(|r| r.job_id.is_some()).collect();
    let newest = match kept {
        Kept::All => usize::MAX,
        Kept::AtLeast(n) | Kept::Newest(n) => n,
    };
    let must = &acknowledged[acknowledged.len().saturating_sub(newest)..];
    for addr in endpoints {
        let listed = match crate::workload::connect([addr.clone()]) {
            Ok(one) => one.list_jobs().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match listed {
            Ok(listed) => {
                for run in must {
                    let Some(id) = &run.job_id else { continue };
                    if !listed.iter().any(|j| &j.job_id == id) {
                        problems.push(format!("job {} ({id}): acknowledged, but {addr} does not list it", run.k));
                    }
                }
                // The first job finished long before the end: a bounded
                // history has forgotten it.
                let first = acknowledged.first().and_then(|r| r.job_id.as_ref());
                if let (Kept::Newest(kept), Some(first)) = (kept, first) {
                    if acknowledged.len() > 2 * kept && listed.iter().any(|j| &j.job_id == first) {
                        problems.push(format!(
                            "{addr} still lists the first job ({first}) of {}: its history of {kept} was not bounded",
                            acknowledged.len()
                        ));
                    }
                }
            }
            Err(e) => problems.push(format!("{addr} did not list the jobs after the run: {e}")),
        }
    }
    problems
}
