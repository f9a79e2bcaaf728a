//! Every name, label, port and path the Kubernetes body gives its objects, in one place. Pure.
//!
//! Object names derive from the `ShardedDatabase`'s name; a server's objects from its topology name
//! (`Server0` → `students-server0`), lowercased because object names are DNS labels. Validation
//! already rejects server names that differ only in case, so lowercasing keeps them distinct.

use std::collections::BTreeMap;

/// The one server-side-apply field manager the operator writes with.
pub const MANAGER: &str = "sharddb-operator";
/// `app.kubernetes.io/name` of everything we create.
pub const APP_NAME: &str = "sharddb";

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";
/// The `ShardedDatabase` an object belongs to.
pub const LABEL_DATABASE: &str = "sharddb.io/database";
/// The topology name of the server a pod runs (`Server0`).
pub const LABEL_SERVER: &str = "sharddb.io/server";

pub const COMPONENT_SERVER: &str = "server";
pub const COMPONENT_ROUTER: &str = "router";

/// The port both the shard server and the router serve HTTP on (the seed's port).
pub const HTTP_PORT: i32 = 5000;
pub const HTTP_PORT_NAME: &str = "http";
/// Postgres listens on the pod's loopback only.
pub const POSTGRES_PORT: i32 = 5432;
/// The database the shard server uses inside its Postgres.
pub const POSTGRES_DB: &str = "sharddb";
/// The uid/gid of the `postgres` user in the upstream image; the shard server runs as it too, so
/// both containers can share the pod's security context.
pub const POSTGRES_UID: i64 = 999;
/// The uid the router runs as (any non-root uid; the router writes nothing to disk).
pub const ROUTER_UID: i64 = 65532;

/// The ConfigMap key holding the topology document.
pub const TOPOLOGY_KEY: &str = "topology.json";
/// Secret keys of the Postgres credentials.
pub const SECRET_USER_KEY: &str = "username";
pub const SECRET_PASSWORD_KEY: &str = "password";
/// The Postgres user the shard server connects as.
pub const POSTGRES_USER: &str = "sharddb";

/// The volume holding Postgres' data directory (a PVC template when storage is declared).
pub const DATA_VOLUME: &str = "data";
pub const DATA_MOUNT: &str = "/var/lib/postgresql/data";
/// `PGDATA` is a subdirectory, since a fresh volume's root may hold `lost+found`.
pub const PGDATA: &str = "/var/lib/postgresql/data/pgdata";

/// Where every pod mounts its certificate Secret: `tls.crt`, `tls.key` and `ca.crt`, as the
/// components' `--tls-dir` expects. A Secret volume (never `subPath`) so renewals reach the pod.
pub const TLS_VOLUME: &str = "tls";
pub const TLS_MOUNT: &str = "/etc/sharddb/tls";
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";
pub const CA_CERT_KEY: &str = "ca.crt";
/// The CA's private key in the operator's `<db>-ca` Secret (never mounted anywhere).
pub const CA_KEY_KEY: &str = "ca.key";
/// In the router's certificate Secret: the CA of the operator's admin endpoint, which serves
/// every database under the operator's own CA.
pub const OPERATOR_CA_KEY: &str = "operator-ca.crt";
/// The router's admin token (`/init`, `/add`, `/rm`), mounted from `<db>-admin-token`.
pub const ADMIN_TOKEN_VOLUME: &str = "admin-token";
pub const ADMIN_TOKEN_MOUNT: &str = "/etc/sharddb/admin";
pub const ADMIN_TOKEN_KEY: &str = "token";

/// The operator-made CA of a database (`ca.crt`, `ca.key`).
pub fn ca_secret(db: &str) -> String {
    format!("{db}-ca")
}
/// One server's certificate. `tls-` comes first so that no server name can make it collide with
/// the router's.
pub fn server_tls_secret(db: &str, server: &str) -> String {
    format!("{db}-tls-{}", server.to_ascii_lowercase())
}
pub fn router_tls_secret(db: &str) -> String {
    format!("{db}-router-tls")
}
pub fn admin_token_secret(db: &str) -> String {
    format!("{db}-admin-token")
}
/// The NetworkPolicy admitting only the database's components to its servers.
pub fn servers_network_policy(db: &str) -> String {
    format!("{db}-servers")
}
/// The DNS names a server pod is reached by (its certificate's subject alternative names).
pub fn server_dns_names(db: &str, namespace: &str, server: &str) -> Vec<String> {
    let host = format!("{}.{}", server_pod(db, server), headless_service(db));
    vec![
        format!("{host}.{namespace}.svc"),
        format!("{host}.{namespace}.svc.cluster.local"),
        format!("{host}.{namespace}"),
        host,
    ]
}
/// The DNS names of the router Service (its certificate's, for clients over TLS).
pub fn router_dns_names(db: &str, namespace: &str) -> Vec<String> {
    let service = router(db);
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service,
    ]
}

pub fn headless_service(db: &str) -> String {
    format!("{db}-servers")
}
pub fn server_pdb(db: &str) -> String {
    format!("{db}-servers")
}
pub fn router_pdb(db: &str) -> String {
    format!("{db}-router")
}
pub fn router(db: &str) -> String {
    format!("{db}-router")
}
pub fn topology_configmap(db: &str) -> String {
    format!("{db}-topology")
}
pub fn postgres_secret(db: &str) -> String {
    format!("{db}-postgres")
}
pub fn server_service_account(db: &str) -> String {
    format!("{db}-server")
}
pub fn router_service_account(db: &str) -> String {
    format!("{db}-router")
}
/// The Role (and its RoleBinding) letting routers and servers read the topology ConfigMap.
pub fn topology_reader(db: &str) -> String {
    format!("{db}-topology-reader")
}

/// The StatefulSet of one server: `students` + `Server0` → `students-server0`.
pub fn server_statefulset(db: &str, server: &str) -> String {
    format!("{db}-{}", server.to_ascii_lowercase())
}
/// The single pod of a server's StatefulSet.
pub fn server_pod(db: &str, server: &str) -> String {
    format!("{}-0", server_statefulset(db, server))
}
/// Where a server is reached inside the cluster: its pod's stable DNS name under the headless
/// Service.
pub fn server_url(db: &str, namespace: &str, server: &str) -> String {
    format!("https://{}.{}.{namespace}.svc:{HTTP_PORT}", server_pod(db, server), headless_service(db))
}

/// Labels on every object of a database.
pub fn common_labels(db: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_owned(), APP_NAME.to_owned()),
        (LABEL_INSTANCE.to_owned(), db.to_owned()),
        (LABEL_PART_OF.to_owned(), APP_NAME.to_owned()),
        (LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned()),
        (LABEL_DATABASE.to_owned(), db.to_owned()),
    ])
}

/// Selects every server pod of a database (the headless Service, the PDB).
pub fn servers_selector(db: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_owned(), APP_NAME.to_owned()),
        (LABEL_INSTANCE.to_owned(), db.to_owned()),
        (LABEL_COMPONENT.to_owned(), COMPONENT_SERVER.to_owned()),
    ])
}

/// Selects the pod of one server. The server label value is lowercased: label values allow
/// upper case, but the StatefulSet name does not, and the two should read alike.
pub fn server_selector(db: &str, server: &str) -> BTreeMap<String, String> {
    let mut labels = servers_selector(db);
    labels.insert(LABEL_SERVER.to_owned(), server.to_ascii_lowercase());
    labels
}

pub fn router_selector(db: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_owned(), APP_NAME.to_owned()),
        (LABEL_INSTANCE.to_owned(), db.to_owned()),
        (LABEL_COMPONENT.to_owned(), COMPONENT_ROUTER.to_owned()),
    ])
}

/// A label selector string for list calls.
pub fn selector_string(labels: &BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_dns_labels_and_urls_use_the_headless_service() {
        assert_eq!(server_statefulset("students", "Server0"), "students-server0");
        assert_eq!(server_pod("students", "Server10"), "students-server10-0");
        assert_eq!(
            server_url("students", "prod", "Server1"),
            "https://students-server1-0.students-servers.prod.svc:5000"
        );
    }

    #[test]
    fn selectors_are_narrower_than_common_labels() {
        let common = common_labels("db");
        for (k, v) in servers_selector("db").iter().filter(|(k, _)| *k != LABEL_COMPONENT) {
            assert_eq!(common.get(k), Some(v), "{k}");
        }
        let one = server_selector("db", "Server3");
        assert_eq!(one[LABEL_SERVER], "server3");
        assert_ne!(servers_selector("db"), router_selector("db"));
        assert_eq!(
            selector_string(&router_selector("db")),
            "app.kubernetes.io/component=router,app.kubernetes.io/instance=db,app.kubernetes.io/name=sharddb"
        );
    }
}
