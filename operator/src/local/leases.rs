//! The local body's primary leases (see `brain::lease`): one book, shared by the task that grants
//! every primary its lease every [`exec::GRANT_EVERY`] and by the healer, which asks it before it
//! publishes a topology that changes a primary. Grants run in a task of their own so that a slow
//! healer round (a server starting for `/add`, a fault being injected) never lets leases lapse.
//! Does I/O (HTTP to the servers).

use crate::brain::lease::{DEFAULT_PRIMARY_LEASE, LeaseBook};
use crate::exec;
use shard_server::api::LeaseToken;
use shard_server::tls::Credentials;
use shard_server::topology::Topology;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The book and what granting needs; clones share them.
#[derive(Clone)]
pub struct Leases {
    book: Arc<Mutex<LeaseBook>>,
    tokens: Arc<Mutex<HashMap<String, LeaseToken>>>,
    http: reqwest::Client,
}

impl Leases {
    /// A book that knows no grant (an earlier run's are waited out: see `brain::lease`); grants
    /// go out presenting the operator's `credentials` (servers take them from it alone).
    pub fn new(credentials: &Credentials) -> Leases {
        Leases {
            book: Arc::new(Mutex::new(LeaseBook::new(DEFAULT_PRIMARY_LEASE, Instant::now()))),
            tokens: Arc::default(),
            http: credentials.http_client(exec::PROBE_TIMEOUT),
        }
    }

    pub fn book(&self) -> &Arc<Mutex<LeaseBook>> {
        &self.book
    }

    /// Follows `topology` and grants every primary its lease now (servers just started serve
    /// reads at once, not at the next tick).
    pub async fn grant_now(&self, topology: Option<&Topology>) {
        if let Some(t) = topology {
            self.book.lock().expect("lease book lock").follow(t);
        }
        exec::grant_primary_leases(&self.http, &self.book, &self.tokens, &published).await;
    }

    /// Grants leases every [`exec::GRANT_EVERY`] until the returned task is aborted. Each tick's
    /// grants run on their own, so a server slow to answer holds up no other's.
    pub fn spawn(&self) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(exec::GRANT_EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut running = tokio::task::JoinSet::new();
            loop {
                ticks.tick().await;
                while running.try_join_next().is_some() {}
                let me = me.clone();
                running
                    .spawn(async move { exec::grant_primary_leases(&me.http, &me.book, &me.tokens, &published).await });
            }
        })
    }
}

/// Local servers are reached at the URL the topology gives them.
fn published(_server: &str, url: &str) -> String {
    url.to_owned()
}
