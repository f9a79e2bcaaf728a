//! A 1,000,000-row shard streams as a snapshot without the shard server ever holding it whole:
//! its peak resident memory stays far below the size of the data it sent.

use std::io::Write as _;
use tests::LocalCluster;

const ROWS: i64 = 1_000_000;
/// Each row carries ~80 bytes of text, so the whole shard is ~90 MB of JSON lines.
const PAD: usize = 64;

fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).ok_or_else(|| anyhow::anyhow!("no VmHWM"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

#[tokio::test]
async fn a_million_row_snapshot_streams_in_bounded_memory() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("one.yaml");
    write!(
        std::fs::File::create(&spec)?,
        "apiVersion: sharddb.io/v1alpha1\nkind: ShardedDatabase\nmetadata: {{name: big}}\nspec:\n  \
         schema: {{columns: [Stud_id, Stud_name, Stud_marks], dtypes: [Number, String, Number]}}\n  \
         shards: [{{id: sh1, low: 0, size: {ROWS}}}]\n  replicas: 1\n  servers: 1\n"
    )?;
    let c = LocalCluster::start(&spec)?;
    let file = c.cluster_file()?;
    let server = &file.servers[0];
    let pid = server.pid.expect("server runs");

    // Load straight into the shard's table: the write path is not what is measured here.
    let db = sqlx::PgPool::connect(&server.postgres.connect_url()?).await?;
    sqlx::query(
        "INSERT INTO \"shard_sh1\" SELECT g, 'name-' || g || repeat('x', $2), g % 100 FROM generate_series(0, $1 - 1) g",
    )
    .bind(ROWS)
    .bind(PAD as i32)
    .execute(&db)
    .await?;
    let before = peak_rss_kib(pid)?;

    // No overall deadline for ~100 MB from a debug build on a busy machine; each read is bounded.
    let http =
        file.operator_credentials()?.client_builder().read_timeout(std::time::Duration::from_secs(60)).build()?;
    let mut resp = http.get(format!("{}/v1/shards/sh1/snapshot", server.url)).send().await?;
    assert_eq!(resp.status(), 200);
    let (mut bytes, mut lines) = (0u64, 0u64);
    while let Some(chunk) = resp.chunk().await? {
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    // Header, every row, end marker.
    assert_eq!(lines, ROWS as u64 + 2);
    let after = peak_rss_kib(pid)?;
    let grew_mib = after.saturating_sub(before) / 1024;
    let sent_mib = bytes / (1024 * 1024);
    println!("snapshot: {sent_mib} MiB streamed; shard server peak RSS {before} KiB -> {after} KiB");
    assert!(sent_mib >= 80, "the test must move more data than the bound it checks ({sent_mib} MiB)");
    assert!(grew_mib < 40, "peak RSS grew by {grew_mib} MiB while streaming {sent_mib} MiB: the snapshot was buffered");
    Ok(())
}
