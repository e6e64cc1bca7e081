//! `cargo run --release -p simulations -- --seeds 0..1000`: runs seeds and prints a
//! summary; a failing seed is printed with the command that replays it with a trace.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

use clap::Parser;
use simulations::{Config, Report, run};

/// Deterministic simulations of Concord agents under faults.
#[derive(Debug, Parser)]
#[command(name = "simulations")]
struct Cli {
    /// The seeds to run, as `A..B` (B excluded) or one number.
    #[arg(long, default_value = "0..16", value_parser = parse_seeds)]
    seeds: Range<u64>,
    /// Agents per run; 0 picks 3 to 7 from each seed.
    #[arg(long, default_value_t = 0)]
    agents: usize,
    /// Simulated minutes of faults per run.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Print the readable trace of each run (use with one seed).
    #[arg(long)]
    trace: bool,
}

fn parse_seeds(text: &str) -> Result<Range<u64>, String> {
    match text.split_once("..") {
        Some((a, b)) => {
            let a: u64 = a.parse().map_err(|e| format!("{text}: {e}"))?;
            let b: u64 = b.parse().map_err(|e| format!("{text}: {e}"))?;
            if b <= a {
                return Err(format!("{text}: an empty range"));
            }
            Ok(a..b)
        }
        None => {
            let a: u64 = text.parse().map_err(|e| format!("{text}: {e}"))?;
            Ok(a..a + 1)
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = Config {
        agents: cli.agents,
        fault_ms: (cli.minutes * 60_000.0) as u64,
        trace: cli.trace,
        ..Config::default()
    };
    let started = Instant::now();
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut runs, mut sim_ms, mut checks, mut edits, mut agents) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut group_commits, mut docs_compacted) = (0u64, 0u64);
    let (mut frames, mut frame_bytes, mut heal_max_ms) = (0u64, 0u64, 0u64);
    let mut failures: Vec<Report> = Vec::new();
    for seed in cli.seeds.clone() {
        let report = run(seed, &config);
        if cli.trace {
            for line in &report.trace {
                println!("{line}");
            }
        }
        runs += 1;
        sim_ms += report.sim_ms;
        checks += report.checks;
        edits += report.edits;
        group_commits += report.group_commits;
        docs_compacted += report.docs_compacted;
        frames += report.frames;
        frame_bytes += report.frame_bytes;
        heal_max_ms = heal_max_ms.max(report.heal_ms);
        agents += report.agents as u64;
        for (kind, n) in &report.faults {
            *faults.entry(kind).or_default() += n;
        }
        if let Some(failure) = &report.failure {
            eprintln!("seed {seed} FAILED: {failure}");
            eprintln!(
                "  replay: cargo run --release -p simulations -- --seeds {seed} --agents {} --minutes {} --trace",
                cli.agents, cli.minutes
            );
            failures.push(report);
        }
    }
    println!("runs                 {runs}");
    println!("agents simulated     {agents}");
    println!("simulated time       {:.1} h", sim_ms as f64 / 3_600_000.0);
    println!("user edits           {edits}");
    println!("invariant checks     {checks}");
    println!("group commits        {group_commits} (of two requests or more)");
    println!("docs compacted       {docs_compacted} (saved again as one by idle cores)");
    println!(
        "frames sent          {frames} ({:.1} MB)",
        frame_bytes as f64 / 1e6
    );
    println!(
        "longest heal         {:.1} s simulated (bound {:.0} s)",
        heal_max_ms as f64 / 1000.0,
        config.heal_bound_ms as f64 / 1000.0
    );
    for (kind, n) in &faults {
        println!("fault {kind:<20} {n}");
    }
    println!("failed seeds         {}", failures.len());
    println!(
        "wall time            {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
