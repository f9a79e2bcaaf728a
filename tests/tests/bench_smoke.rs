//! Smoke test of the benchmark program's library: a tiny run of A-1 (sharddb, plain Postgres with
//! `pgbench`, and the same SQL one transaction per request), the heal of a small wiped copy and the
//! cold start, against local clusters of the debug binaries. It checks that the report carries
//! every field, that no operation failed and that the renderings are written — and asserts no
//! timing at all.

use tests::bench::{self, Options, Workload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_run_reports_every_field_without_errors() -> anyhow::Result<()> {
    let mut opts = Options::new(vec![Workload::A1, Workload::Heal, Workload::Cold]);
    opts.ops = 100;
    opts.warmup = 20;
    opts.concurrency = 10;
    opts.heal_rows = vec![2_000];
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
    assert!(floor["anchor_ops_per_s"].is_null(), "{floor}");
    assert_eq!((&floor["ops"], &floor["errors"]), (&serde_json::json!(100), &serde_json::json!(0)), "{floor}");
    for r in &results[..2] {
        for field in [
            "ops_per_s",
            "baseline_ops_per_s",
            "ratio",
            "p50_ms",
            "p99_ms",
            "p999_ms",
            "cpu_s_per_1k_ops",
            "anchor_ops_per_s",
            "anchor_ratio",
            "anchor_p50_ms",
            "anchor_p99_ms",
            "anchor_p999_ms",
        ] {
            assert!(r[field].is_number(), "{} lacks {field}: {r}; notes: {:?}", r["workload"], report.notes);
        }
        assert!(r["anchor_script"].is_string(), "{r}");
        assert_eq!((&r["ops"], &r["warmup_ops"]), (&serde_json::json!(100), &serde_json::json!(20)), "{r}");
        assert_eq!(r["anchor_ops"], 100, "{r}");
        assert_eq!(r["errors"], 0, "{}", r["error_samples"]);
        assert_eq!(r["baseline_errors"], 0, "{}", r["baseline_error_samples"]);
        assert_eq!(r["anchor_errors"], 0, "{r}");
        assert!(r["cpu"]["router_s"].is_number() && r["cpu"]["shard_servers_s"].is_number());
    }
    assert_eq!(report.errors_total, 0);

    let cold = &json["cold_start"];
    assert!(cold["ops"].as_u64().unwrap() > 0 && cold["errors"] == 0, "{cold}");
    assert!(cold["first_ack_ms"].is_number() && cold["p99_ms"].is_number() && cold["start_s"].is_number(), "{cold}");
    assert_eq!(cold["lease_wait_skipped"], true, "a new cluster's servers start without predecessor: {cold}");

    let heal = &json["heals"][0];
    assert_eq!((&heal["rows"], &heal["error"]), (&serde_json::json!(2000), &serde_json::Value::Null), "{heal}");
    for field in ["stream_rows_per_s", "heal_rows_per_s", "recover_s", "restart_to_ready_s"] {
        assert!(heal[field].is_number(), "heal lacks {field}: {heal}");
    }
    assert!(heal["timings"]["copy_us"].as_u64().unwrap() > 0, "{heal}");

    let mem = &json["memory"][0];
    for field in ["shard_server_rest_mib", "shard_server_peak_mib", "router_peak_mib"] {
        assert!(mem[field].is_number(), "memory lacks {field}: {mem}");
    }
    // Five targets of the earlier issues, and one per heal size.
    assert_eq!(report.targets.len(), 6);
    assert!(report.targets[5].name.contains("2,000-row copy"), "{:?}", report.targets[5]);

    let dir = tempfile::tempdir()?;
    bench::write_outputs(&report, dir.path())?;
    let md = std::fs::read_to_string(dir.path().join("benchmarks.md"))?;
    for section in
        ["A-1 single-row writes", "## Against plain Postgres", "## Cold start", "## Heals", "## Where the time goes"]
    {
        assert!(md.contains(section), "the report lacks {section:?}");
    }
    assert!(md.contains("HTTP floor"));
    let back: bench::report::Report = serde_json::from_slice(&std::fs::read(dir.path().join("benchmarks.json"))?)?;
    assert_eq!((back.results.len(), back.heals.len()), (3, 1));
    assert!(std::fs::read_to_string(dir.path().join("benchmarks.svg"))?.contains("</svg>"));
    Ok(())
}
