//! Replays every seed that ever failed, checks that a seed replays exactly, and runs
//! a few fresh seeds.

use simulations::{Config, run};

fn config(agents: usize, minutes: f64) -> Config {
    Config {
        agents,
        fault_ms: (minutes * 60_000.0) as u64,
        ..Config::default()
    }
}

#[test]
fn every_seed_that_ever_failed_passes() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/regressions.txt"))
        .expect("simulations/regressions.txt");
    let mut replayed = 0;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let mut fields = line.split_whitespace();
        let mut next = |what: &str| fields.next().unwrap_or_else(|| panic!("{line}: no {what}"));
        let seed: u64 = next("seed").parse().expect("a seed");
        let agents: usize = next("agents").parse().expect("an agent count");
        let minutes: f64 = next("minutes").parse().expect("minutes");
        let report = run(seed, &config(agents, minutes));
        assert!(
            report.failure.is_none(),
            "regression seed {seed}: {:?}",
            report.failure
        );
        replayed += 1;
    }
    assert!(replayed > 0, "no regression seeds found");
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    let first = run(42, &config(4, 1.0));
    let second = run(42, &config(4, 1.0));
    assert!(first.failure.is_none(), "{:?}", first.failure);
    assert_eq!(first.trace_hash, second.trace_hash);
    assert_eq!(first.faults, second.faults);
    let other = run(43, &config(4, 1.0));
    assert_ne!(
        first.trace_hash, other.trace_hash,
        "different seeds made the same run"
    );
}

#[test]
fn fresh_seeds_pass_every_invariant() {
    for seed in 1000..1008 {
        let report = run(seed, &config(0, 2.0));
        assert!(
            report.failure.is_none(),
            "seed {seed}: {:?}",
            report.failure
        );
        assert!(
            report.checks >= 4,
            "seed {seed} ran only {} checks",
            report.checks
        );
    }
}
