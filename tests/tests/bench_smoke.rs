//! Smoke test of the benchmark program's library: a tiny A-1 run (router and baseline) against a
//! local cluster of the debug binaries. It checks that the report carries every field, that no
//! operation failed and that the renderings are written — and asserts no timing at all.

use tests::bench::{self, Options, Workload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_a1_run_reports_every_field_without_errors() -> anyhow::Result<()> {
    let mut opts = Options::new(vec![Workload::A1]);
    opts.ops = 100;
    opts.concurrency = 10;
    opts.quick = true;
    let report = bench::run(&opts).await?;
    assert!(report.failed_workloads.is_empty(), "{:?}", report.failed_workloads);

    let json = serde_json::to_value(&report)?;
    let results = json["results"].as_array().expect("results");
    let names: Vec<&str> = results.iter().map(|r| r["workload"].as_str().unwrap()).collect();
    assert_eq!(names, ["a1-write", "a1-read", "http-floor"]);
    // The HTTP floor has no baseline: it measures the router and the load generator alone.
    let floor = &results[2];
    assert!(floor["ops_per_s"].is_number() && floor["baseline_ops_per_s"].is_null(), "{floor}");
    assert_eq!((&floor["ops"], &floor["errors"]), (&serde_json::json!(100), &serde_json::json!(0)), "{floor}");
    for r in &results[..2] {
        for field in ["ops_per_s", "baseline_ops_per_s", "ratio", "p50_ms", "p99_ms", "p999_ms", "cpu_s_per_1k_ops"] {
            assert!(r[field].is_number(), "{} lacks {field}: {r}", r["workload"]);
        }
        assert_eq!(r["ops"], 100);
        assert_eq!(r["errors"], 0, "{}", r["error_samples"]);
        assert_eq!(r["baseline_errors"], 0, "{}", r["baseline_error_samples"]);
        assert!(r["cpu"]["router_s"].is_number() && r["cpu"]["shard_servers_s"].is_number());
    }
    assert_eq!(report.errors_total, 0);
    let mem = &json["memory"][0];
    for field in ["shard_server_rest_mib", "shard_server_peak_mib", "router_peak_mib"] {
        assert!(mem[field].is_number(), "memory lacks {field}: {mem}");
    }
    assert_eq!(report.targets.len(), 5);

    let dir = tempfile::tempdir()?;
    bench::write_outputs(&report, dir.path())?;
    let md = std::fs::read_to_string(dir.path().join("benchmarks.md"))?;
    assert!(md.contains("A-1 single-row writes") && md.contains("## Where the time goes"));
    assert!(md.contains("HTTP floor"));
    let back: bench::report::Report = serde_json::from_slice(&std::fs::read(dir.path().join("benchmarks.json"))?)?;
    assert_eq!(back.results.len(), 3);
    assert!(std::fs::read_to_string(dir.path().join("benchmarks.svg"))?.contains("</svg>"));
    Ok(())
}
