//! The child processes of local mode (shard servers, the router): start them, restart them when
//! they exit, stop them on request. Does I/O (processes, log files).
//!
//! Each process has a *desired* state (running or stopped) and one task that drives the real
//! process toward it, so callers only ever state intent: `start`, `stop`, `remove`. A process that
//! exits while it should run is restarted with a backoff (doubling from 200 ms to 5 s, reset once it
//! has stayed up for 10 s). Every change of a pid is announced on [`Supervisor::changes`], which is
//! how `cluster.json` stays current.
//!
//! Children get their own process group, so a Ctrl-C in the terminal reaches only the operator,
//! which then stops them in order; and they get `PR_SET_PDEATHSIG=SIGTERM`, so they do not outlive
//! an operator that was killed outright. (The death signal fires when the *thread* that spawned
//! the child exits; children are spawned from runtime worker threads, which live as long as the
//! operator, never from `spawn_blocking` threads.)

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A process that stayed up this long is considered healthy again: its backoff starts over.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How long a process gets between SIGTERM and SIGKILL, unless its spec says otherwise.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// What to run for one named process.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Flags added on the first start only, never on a restart (e.g. a shard server's
    /// `--no-predecessor`).
    pub first_start_args: Vec<String>,
    /// Receives the process's stdout and stderr (appended, across restarts).
    pub log: PathBuf,
    /// Time between SIGTERM and SIGKILL when stopping it.
    pub stop_grace: Duration,
    /// A network namespace (its file, e.g. `/run/netns/NAME`) the process runs in; it joins it
    /// between fork and exec, so it never has a socket outside it.
    pub netns: Option<PathBuf>,
    /// Environment variables set for it, besides ours: settings a program of an earlier release
    /// ignores, where a flag it does not know would stop it.
    pub env: Vec<(String, String)>,
}

impl ProcessSpec {
    pub fn new(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        args: Vec<String>,
        log: impl Into<PathBuf>,
    ) -> Self {
        ProcessSpec {
            name: name.into(),
            program: program.into(),
            args,
            first_start_args: Vec::new(),
            log: log.into(),
            stop_grace: STOP_GRACE,
            netns: None,
            env: Vec::new(),
        }
    }
}

/// Which program file a process was started from: its path, and the file's size and
/// modification time then, so that a file replaced in place (a rebuild) is another binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BinaryId {
    pub path: PathBuf,
    len: Option<u64>,
    modified: Option<SystemTime>,
}

impl BinaryId {
    /// The file at `path` now (size and time unknown if it cannot be read).
    pub fn of(path: &Path) -> BinaryId {
        let meta = std::fs::metadata(path).ok();
        BinaryId {
            path: path.to_owned(),
            len: meta.as_ref().map(std::fs::Metadata::len),
            modified: meta.and_then(|m| m.modified().ok()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Desired {
    Running,
    Stopped,
    /// The task ends once the process is stopped.
    Removed,
}

struct Managed {
    desired: watch::Sender<Desired>,
    pid: watch::Receiver<Option<u32>>,
    task: JoinHandle<()>,
    /// The program file as it was when supervision began. A crashed process is restarted from
    /// the same path, whatever file is there then; a deliberate change of binary goes through
    /// `remove` and `spawn`, which records the new one.
    binary: BinaryId,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SupervisorError {
    #[error("a process named {0} is already supervised")]
    Exists(String),
    #[error("no process named {0}")]
    Unknown(String),
}

/// Owns the child processes. Share it behind an `Arc`.
pub struct Supervisor {
    procs: Mutex<BTreeMap<String, Managed>>,
    changes: Arc<watch::Sender<u64>>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor { procs: Mutex::new(BTreeMap::new()), changes: Arc::new(watch::channel(0).0) }
    }
}

impl Supervisor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires whenever a supervised pid changes (or [`Supervisor::announce`] is called).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Announces a change made outside the supervisor (e.g. a Postgres restart).
    pub fn announce(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Starts supervising a new process (it is started at once).
    pub fn spawn(&self, spec: ProcessSpec) -> Result<(), SupervisorError> {
        let mut procs = self.procs.lock().expect("supervisor lock");
        if procs.contains_key(&spec.name) {
            return Err(SupervisorError::Exists(spec.name));
        }
        let (desired_tx, desired_rx) = watch::channel(Desired::Running);
        let (pid_tx, pid_rx) = watch::channel(None);
        let name = spec.name.clone();
        let binary = BinaryId::of(&spec.program);
        let task = tokio::spawn(supervise(spec, desired_rx, pid_tx, self.changes.clone()));
        procs.insert(name, Managed { desired: desired_tx, pid: pid_rx, task, binary });
        Ok(())
    }

    /// The program file `name` was started from.
    pub fn binary(&self, name: &str) -> Option<BinaryId> {
        self.procs.lock().expect("supervisor lock").get(name).map(|m| m.binary.clone())
    }

    pub fn names(&self) -> Vec<String> {
        self.procs.lock().expect("supervisor lock").keys().cloned().collect()
    }

    /// The pid of the running process, if it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.lock().expect("supervisor lock").get(name).and_then(|m| *m.pid.borrow())
    }

    /// Asks for the process to run (again); returns at once.
    pub fn start(&self, name: &str) -> Result<(), SupervisorError> {
        self.set(name, Desired::Running).map(drop)
    }

    /// Stops the process (SIGTERM, SIGKILL after a grace period) and waits until it is gone. It
    /// stays stopped until [`Supervisor::start`].
    pub async fn stop(&self, name: &str) -> Result<(), SupervisorError> {
        let mut pid = self.set(name, Desired::Stopped)?;
        let _ = pid.wait_for(Option::is_none).await;
        Ok(())
    }

    /// Stops the process and forgets it.
    pub async fn remove(&self, name: &str) -> Result<(), SupervisorError> {
        self.set(name, Desired::Removed)?;
        let managed = self.procs.lock().expect("supervisor lock").remove(name);
        if let Some(m) = managed {
            let _ = m.task.await;
        }
        Ok(())
    }

    /// Stops and forgets every process, all at once.
    pub async fn shutdown(&self) {
        let all: Vec<Managed> =
            std::mem::take(&mut *self.procs.lock().expect("supervisor lock")).into_values().collect();
        for m in &all {
            m.desired.send_replace(Desired::Removed);
        }
        for m in all {
            let _ = m.task.await;
        }
    }

    fn set(&self, name: &str, desired: Desired) -> Result<watch::Receiver<Option<u32>>, SupervisorError> {
        let procs = self.procs.lock().expect("supervisor lock");
        let m = procs.get(name).ok_or_else(|| SupervisorError::Unknown(name.to_owned()))?;
        m.desired.send_replace(desired);
        Ok(m.pid.clone())
    }
}

/// Drives one process toward its desired state until it is removed.
async fn supervise(
    spec: ProcessSpec,
    mut desired: watch::Receiver<Desired>,
    pid: watch::Sender<Option<u32>>,
    changes: Arc<watch::Sender<u64>>,
) {
    let publish = |p: Option<u32>| {
        pid.send_replace(p);
        changes.send_modify(|n| *n += 1);
    };
    let mut backoff = BACKOFF_MIN;
    let mut restarts = 0u32;
    let mut first = true;
    loop {
        match desired.wait_for(|d| *d != Desired::Stopped).await.map(|d| *d) {
            // A closed channel means the supervisor is gone: never start anything again.
            Ok(Desired::Running) if desired.has_changed().is_ok() => {}
            _ => return,
        }
        let mut child = match spawn_child(&spec, std::mem::take(&mut first)) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(name = %spec.name, program = %spec.program.display(), error = %e, "cannot start process");
                wait_or_change(&mut desired, backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let started = Instant::now();
        let child_pid = child.id();
        publish(child_pid);
        tracing::info!(name = %spec.name, pid = child_pid, "process started");
        let exited = tokio::select! {
            status = child.wait() => Ok(status),
            // Err: the supervisor is gone; stop as if asked to.
            changed = desired.wait_for(|d| *d != Desired::Running) => Err(changed.is_err()),
        };
        match exited {
            Err(orphaned) => {
                terminate(&spec, &mut child).await;
                publish(None);
                note(&spec, "stopped");
                if orphaned {
                    return;
                }
            }
            // It exited while being asked to stop: nothing to restart.
            Ok(_) if *desired.borrow() != Desired::Running => publish(None),
            Ok(status) => {
                publish(None);
                if started.elapsed() >= STABLE_AFTER {
                    backoff = BACKOFF_MIN;
                }
                restarts += 1;
                let status = describe(status);
                tracing::warn!(name = %spec.name, pid = child_pid, %status, restarts, backoff_ms = backoff.as_millis() as u64, "process exited; restarting");
                note(&spec, &format!("exited ({status}); restarting in {} ms", backoff.as_millis()));
                wait_or_change(&mut desired, backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Sleeps for `delay`, or less if the desired state stops being "running".
async fn wait_or_change(desired: &mut watch::Receiver<Desired>, delay: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = desired.wait_for(|d| *d != Desired::Running) => {}
    }
}

/// Starts the process; `first` adds its first-start flags (a failed attempt counts as the first
/// start too: it may have run before failing).
fn spawn_child(spec: &ProcessSpec, first: bool) -> std::io::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&spec.log)?;
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args);
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if first {
        cmd.args(&spec.first_start_args);
    }
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0).kill_on_drop(true);
    let netns = spec.netns.as_ref().map(std::fs::File::open).transpose()?;
    // SAFETY: the closure only makes the prctl and setns system calls, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(std::io::Error::from)?;
            if let Some(ns) = &netns {
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    note(spec, &format!("started pid {}", child.id().unwrap_or(0)));
    Ok(child)
}

/// SIGTERM, then SIGKILL if the process is still there after the grace period.
async fn terminate(spec: &ProcessSpec, child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(spec.stop_grace, child.wait()).await.is_ok() {
            return;
        }
        tracing::warn!(name = %spec.name, pid, "process ignored SIGTERM; killing it");
    }
    let _ = child.kill().await;
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    }
}

/// Marks a lifecycle event in the process's own log, so the log reads as one story.
fn note(spec: &ProcessSpec, event: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&spec.log) {
        let _ = writeln!(f, "--- sharddb-operator: {} {event}", spec.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &std::path::Path, name: &str, script: &str) -> ProcessSpec {
        let mut spec =
            ProcessSpec::new(name, "/bin/sh", vec!["-c".into(), script.into()], dir.join(format!("{name}.log")));
        spec.stop_grace = Duration::from_millis(300);
        spec
    }

    async fn wait_pid(sup: &Supervisor, name: &str, f: impl Fn(Option<u32>) -> bool) -> Option<u32> {
        for _ in 0..200 {
            let p = sup.pid(name);
            if f(p) {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{name}: pid never satisfied the condition (last {:?})", sup.pid(name));
    }

    fn alive(pid: u32) -> bool {
        !localpg::process_gone(pid)
    }

    #[tokio::test]
    async fn restarts_a_killed_process_and_stops_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::new();
        let mut changes = sup.changes();
        sup.spawn(spec(dir.path(), "a", "exec sleep 600")).unwrap();
        assert_eq!(sup.spawn(spec(dir.path(), "a", "true")), Err(SupervisorError::Exists("a".into())));
        let first = wait_pid(&sup, "a", |p| p.is_some()).await.unwrap();
        assert!(changes.has_changed().unwrap(), "a new pid is announced");
        changes.mark_unchanged();

        nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
        let second = wait_pid(&sup, "a", |p| p.is_some_and(|p| p != first)).await.unwrap();
        assert!(alive(second));
        assert!(changes.has_changed().unwrap());

        sup.stop("a").await.unwrap();
        assert_eq!(sup.pid("a"), None);
        assert!(!alive(second), "stop waits for the exit");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(sup.pid("a"), None, "a stopped process is not restarted");

        sup.start("a").unwrap();
        let third = wait_pid(&sup, "a", |p| p.is_some()).await.unwrap();
        sup.shutdown().await;
        assert!(!alive(third));
        assert!(sup.names().is_empty());
        let log = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
        assert!(log.contains(&format!("a started pid {first}")), "{log}");
        assert!(log.contains("exited (signal: 9 (SIGKILL))"), "{log}");
    }

    #[tokio::test]
    async fn a_crash_loop_backs_off_and_output_goes_to_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::new();
        sup.spawn(spec(dir.path(), "crashy", "echo out; echo err >&2; exit 3")).unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        sup.remove("crashy").await.unwrap();
        let log = std::fs::read_to_string(dir.path().join("crashy.log")).unwrap();
        let starts = log.matches("started pid").count();
        // 0, 200, 600 ms (+ spawn time): a few starts, not hundreds.
        assert!((2..=4).contains(&starts), "{starts} starts:\n{log}");
        assert!(log.contains("out\nerr\n"), "{log}");
        assert!(log.contains("exited (exit status: 3); restarting in 200 ms"), "{log}");
        assert_eq!(sup.stop("crashy").await, Err(SupervisorError::Unknown("crashy".into())));
    }

    #[tokio::test]
    async fn first_start_flags_are_given_once() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::new();
        // `sh -c SCRIPT NAME ARGS...`: the script prints its arguments, then exits to be restarted.
        let mut s = spec(dir.path(), "once", "echo \"args:$*\"; exit 1");
        s.args.push("once".into());
        s.args.push("--always".into());
        s.first_start_args.push("--first".into());
        sup.spawn(s).unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        sup.remove("once").await.unwrap();
        let log = std::fs::read_to_string(dir.path().join("once.log")).unwrap();
        let runs: Vec<&str> = log.lines().filter(|l| l.starts_with("args:")).collect();
        assert!(runs.len() >= 2, "{log}");
        assert_eq!(runs[0], "args:--always --first");
        assert!(runs[1..].iter().all(|r| *r == "args:--always"), "{log}");
    }

    #[tokio::test]
    async fn a_process_runs_in_its_network_namespace() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: network namespaces cannot be made, nothing to check");
            return;
        }
        let name = format!("sdbsup{}", std::process::id());
        let made = std::process::Command::new("ip").args(["netns", "add", &name]).status().unwrap();
        assert!(made.success(), "ip netns add {name}");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ns");
        let mut spec =
            spec(dir.path(), "inside", &format!("readlink /proc/$$/ns/net > {}; exec sleep 600", out.display()));
        spec.netns = Some(PathBuf::from("/run/netns").join(&name));
        let sup = Supervisor::new();
        sup.spawn(spec).unwrap();
        wait_pid(&sup, "inside", |p| p.is_some()).await;
        while std::fs::read_to_string(&out).map_or(true, |s| !s.ends_with('\n')) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sup.shutdown().await;
        let inode = std::fs::metadata(PathBuf::from("/run/netns").join(&name)).unwrap().ino();
        let _ = std::process::Command::new("ip").args(["netns", "delete", &name]).status();
        assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), format!("net:[{inode}]"));
    }

    #[tokio::test]
    async fn a_process_ignoring_sigterm_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::new();
        // The trap must be set before stop is asked for: wait for the marker.
        let marker = dir.path().join("ready");
        sup.spawn(spec(
            dir.path(),
            "stubborn",
            &format!("trap '' TERM; touch {}; while :; do sleep 0.1; done", marker.display()),
        ))
        .unwrap();
        while !marker.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = sup.pid("stubborn").unwrap();
        let t0 = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), sup.stop("stubborn")).await.unwrap().unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(300), "it had its grace period");
        assert!(!alive(pid));
        let log = std::fs::read_to_string(dir.path().join("stubborn.log")).unwrap();
        assert!(log.contains("stubborn stopped"), "{log}");
    }
}
