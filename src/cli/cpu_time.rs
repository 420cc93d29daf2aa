//! The process's CPU time and the machine's stolen time, read from Linux's
//! `/proc`, so that `bench publish` reports the CPU an acknowledged event
//! cost (issue 15's figure at 64 publishers) and how much of the machine a
//! hypervisor took meanwhile, in the same line as its events/s.
//!
//! Both come in clock ticks (`USER_HZ`, 100 a second on every Linux
//! architecture ctrlbus builds for), so a run's CPU is known to ±10 ms:
//! ±1.4% of the 0.7 s that 100,000 events at 64 publishers take.
//!
//! Invariants:
//! - [`Sample::now`] is `None` where `/proc` can't be read or parsed (not
//!   Linux, or a sandbox without it); the report then leaves the fields
//!   out rather than printing a made-up zero.
//! - The process's time is user + system of every thread, the ones that
//!   ended among them (the kernel folds a thread's time into the process
//!   when it exits), as `/usr/bin/time` counts it.

/// Clock ticks a second in `/proc` (`USER_HZ`).
const TICKS_PER_SEC: f64 = 100.0;

/// One reading of the process's and the machine's CPU counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    /// User + system ticks of this process.
    process: u64,
    /// Ticks the hypervisor ran something else on this machine's CPUs.
    steal: u64,
    /// All ticks of all CPUs (idle included).
    total: u64,
}

/// What was spent between two samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Spent {
    /// Seconds of CPU this process used.
    pub(crate) process_secs: f64,
    /// The share of the machine's CPU time stolen by the hypervisor, in
    /// percent (0 with no ticks between the samples).
    pub(crate) steal_pct: f64,
}

impl Sample {
    /// Reads the counters now; `None` if `/proc` can't tell them.
    pub(crate) fn now() -> Option<Sample> {
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        let machine = std::fs::read_to_string("/proc/stat").ok()?;
        let process = process_ticks(&own)?;
        let (steal, total) = machine_ticks(&machine)?;
        Some(Sample {
            process,
            steal,
            total,
        })
    }

    /// What was spent from `earlier` to this sample.
    pub(crate) fn since(&self, earlier: &Sample) -> Spent {
        let ticks = |now: u64, then: u64| now.saturating_sub(then) as f64;
        let total = ticks(self.total, earlier.total);
        Spent {
            process_secs: ticks(self.process, earlier.process) / TICKS_PER_SEC,
            steal_pct: if total > 0.0 {
                100.0 * ticks(self.steal, earlier.steal) / total
            } else {
                0.0
            },
        }
    }
}

/// utime + stime from a `/proc/<pid>/stat` line: fields 14 and 15, counted
/// after the command name, which is in parentheses and may itself hold
/// spaces and parentheses (so the split is at the last `)`).
fn process_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name: utime is field 14.
    let mut fields = after_name.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// (steal, all) ticks from `/proc/stat`'s first line: `cpu  user nice
/// system idle iowait irq softirq steal guest guest_nice`. Guest time is
/// already inside user and nice, so it is not added again; a kernel too
/// old to report steal has none.
fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?;
    let mut fields = line.split_ascii_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if values.len() < 4 {
        return None;
    }
    Some((values.get(7).copied().unwrap_or(0), values.iter().sum()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_ticks_are_counted_after_the_last_parenthesis() {
        // A command name with a space and a ") " in it, as a thread may be
        // named: splitting at the first ')' would read the wrong fields.
        let stat = "4242 (ctrl) bus x) S 1 4242 4242 0 -1 4194304 1500 0 0 0 \
                    731 269 0 0 20 0 9 0 12345 1000000 800 18446744073709551615";
        assert_eq!(process_ticks(stat), Some(731 + 269));
    }

    #[test]
    fn a_process_line_cut_short_or_garbled_gives_nothing() {
        assert_eq!(process_ticks("4242 (ctrlbus) S 1 4242"), None);
        assert_eq!(process_ticks("no name here"), None);
        assert_eq!(
            process_ticks("4242 (ctrlbus) S 1 2 3 4 5 6 7 8 9 10 x 269"),
            None
        );
    }

    #[test]
    fn the_machine_ticks_sum_the_first_eight_fields_and_take_the_eighth_as_steal() {
        let stat = "cpu  73672 0 10537 1289047 3956 0 2186 4215 0 0\n\
                    cpu0 36000 0 5000 640000 2000 0 1000 2100 0 0\n";
        assert_eq!(
            machine_ticks(stat),
            Some((4215, 73672 + 10537 + 1289047 + 3956 + 2186 + 4215))
        );
        // A kernel without the steal field.
        assert_eq!(machine_ticks("cpu 10 0 5 100\n"), Some((0, 115)));
        assert_eq!(machine_ticks("cpu0 10 0 5 100\n"), None);
        assert_eq!(machine_ticks("cpu 10 0\n"), None);
        assert_eq!(machine_ticks(""), None);
    }

    #[test]
    fn spent_is_the_difference_in_seconds_and_percent() {
        let a = Sample {
            process: 100,
            steal: 40,
            total: 1000,
        };
        let b = Sample {
            process: 173,
            steal: 90,
            total: 1200,
        };
        let spent = b.since(&a);
        assert!((spent.process_secs - 0.73).abs() < 1e-9);
        assert!((spent.steal_pct - 25.0).abs() < 1e-9);
        assert!(a.since(&a).steal_pct.abs() < f64::EPSILON);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_seen_to_spend_cpu() {
        let start = Sample::now().expect("/proc readable on Linux");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut x = 0u64;
        loop {
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            let spent = Sample::now().unwrap().since(&start);
            if spent.process_secs >= 0.05 {
                assert!((0.0..=100.0).contains(&spent.steal_pct));
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "20 s of spinning, and /proc shows {} s of CPU",
                spent.process_secs
            );
        }
    }
}
