//! CPU time and memory of the processes under test, read from `/proc`: per-process utime+stime
//! (children included, so a Postgres server counts its exited backends), machine-wide busy time from
//! `/proc/stat`, and `VmRSS`/`VmHWM`. Does I/O (reads `/proc`); Linux only.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

/// Clock ticks per second of `/proc` CPU times. Linux fixes USER_HZ at 100 in its ABI on every
/// architecture we run on, so it is not looked up.
const TICKS_PER_S: f64 = 100.0;

/// The processes whose CPU time a phase is charged with, by role.
#[derive(Clone, Debug, Default)]
pub struct Watched {
    pub router: Option<u32>,
    pub shard_servers: Vec<u32>,
    /// Postmasters: each counts with all its children (backends, checkpointer, WAL writer...).
    pub postgres: Vec<u32>,
}

/// CPU ticks by role at one instant.
#[derive(Clone, Debug)]
pub struct CpuSample {
    at: Instant,
    router: u64,
    shard_servers: u64,
    postgres: u64,
    load_generator: u64,
    machine_busy: u64,
    machine_total: u64,
}

/// CPU seconds spent during a phase, by role.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuUsage {
    pub wall_s: f64,
    pub router_s: f64,
    pub shard_servers_s: f64,
    /// Every Postgres process of the servers (backends included).
    pub postgres_s: f64,
    /// This benchmark process (the clients).
    pub load_generator_s: f64,
    /// Busy time of the whole machine (user+nice+system+irq+softirq+steal).
    pub machine_s: f64,
    /// `machine_s` over the machine's capacity in the phase (1.0 = every core busy).
    pub machine_utilisation: f64,
}

impl CpuUsage {
    /// Router + shard servers + Postgres: what the system under test burnt.
    pub fn system_s(&self) -> f64 {
        self.router_s + self.shard_servers_s + self.postgres_s
    }
    /// Machine time not charged to any watched role (other processes, kernel threads).
    pub fn other_s(&self) -> f64 {
        (self.machine_s - self.system_s() - self.load_generator_s).max(0.0)
    }
}

/// One process's `/proc/<pid>/stat` fields that matter here.
struct Stat {
    ppid: u32,
    /// utime + stime + cutime + cstime.
    ticks: u64,
}

fn read_stat(pid: &str) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); ppid is field 4; utime..cstime are fields 14..17.
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat { ppid: n(1)? as u32, ticks: n(11)? + n(12)? + n(13)? + n(14)? })
}

fn all_stats() -> HashMap<u32, Stat> {
    let mut out = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(pid) = name.parse::<u32>() else { continue };
            if let Some(s) = read_stat(name) {
                out.insert(pid, s);
            }
        }
    }
    out
}

/// `(busy, total)` ticks of the whole machine.
fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else { return (0, 0) };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is already inside user).
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy, busy + get(3) + get(4))
}

impl Watched {
    pub fn sample(&self) -> CpuSample {
        let stats = all_stats();
        let own = |pid: &u32| stats.get(pid).map_or(0, |s| s.ticks);
        let with_children =
            |pid: &u32| own(pid) + stats.values().filter(|s| s.ppid == *pid).map(|s| s.ticks).sum::<u64>();
        let (machine_busy, machine_total) = machine_ticks();
        CpuSample {
            at: Instant::now(),
            router: self.router.as_ref().map_or(0, own),
            shard_servers: self.shard_servers.iter().map(own).sum(),
            postgres: self.postgres.iter().map(with_children).sum(),
            load_generator: own(&std::process::id()),
            machine_busy,
            machine_total,
        }
    }
}

impl CpuSample {
    /// What was spent between `self` (earlier) and `later`.
    pub fn until(&self, later: &CpuSample) -> CpuUsage {
        let s = |a: u64, b: u64| b.saturating_sub(a) as f64 / TICKS_PER_S;
        let total = s(self.machine_total, later.machine_total);
        let machine = s(self.machine_busy, later.machine_busy);
        CpuUsage {
            wall_s: later.at.duration_since(self.at).as_secs_f64(),
            router_s: s(self.router, later.router),
            shard_servers_s: s(self.shard_servers, later.shard_servers),
            postgres_s: s(self.postgres, later.postgres),
            load_generator_s: s(self.load_generator, later.load_generator),
            machine_s: machine,
            machine_utilisation: if total > 0.0 { machine / total } else { 0.0 },
        }
    }
}

/// `VmRSS` and `VmHWM` (peak) of a process, in MiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub rss_mib: f64,
    pub peak_mib: f64,
}

pub fn memory(pid: u32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |field: &str| {
        text.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some(Memory { rss_mib: kib("VmRSS:")? / 1024.0, peak_mib: kib("VmHWM:")? / 1024.0 })
}

/// The children of `pid` (a postmaster's backends).
pub fn children(pid: u32) -> Vec<u32> {
    all_stats().into_iter().filter(|(_, s)| s.ppid == pid).map(|(p, _)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let own = read_stat(&std::process::id().to_string()).expect("own stat");
        assert!(own.ppid > 0);
        let m = memory(std::process::id()).expect("own status");
        assert!(m.peak_mib >= m.rss_mib && m.rss_mib > 0.0);
        let (busy, total) = machine_ticks();
        assert!(total >= busy && busy > 0);
    }

    #[test]
    fn usage_is_the_difference() {
        let w = Watched::default();
        let a = w.sample();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let u = a.until(&w.sample());
        assert!(u.wall_s > 0.0 && u.load_generator_s >= 0.0 && u.router_s == 0.0);
    }
}
