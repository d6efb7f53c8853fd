//! What every scenario needs: the cluster, a namespace of its own, waits with a deadline,
//! Events, kubectl, and figures printed and collected for docs/benchmarks.md.

pub mod model;
pub mod operator;
pub mod traffic;

use std::fmt::Display;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The field manager of everything the suite writes.
pub const MANAGER: &str = "kasmina-e2e";
/// A folder the operator may mount `file://` sources from, beside the model's (the chart's
/// `hostPaths`); bad input names a missing source under it.
pub const E2E_HOST_PATH: &str = "/var/lib/kasmina/e2e";

/// Why a scenario cannot run: said loudly, never skipped silently.
const NEEDS_CLUSTER: &str = "needs a cluster: `just e2e-local` starts a real control plane and \
     runs the suite; `just e2e` runs it against the cluster in KUBECONFIG (KASMINA_E2E=1)";

/// A client for the cluster in KUBECONFIG, or a failure saying why there is none.
pub async fn client() -> Client {
    assert_eq!(
        std::env::var("KASMINA_E2E").as_deref(),
        Ok("1"),
        "{NEEDS_CLUSTER}"
    );
    let client = Client::try_default()
        .await
        .unwrap_or_else(|e| panic!("KASMINA_E2E=1 but no cluster is configured: {e}"));
    client
        .apiserver_version()
        .await
        .unwrap_or_else(|e| panic!("KASMINA_E2E=1 but the cluster is unreachable: {e}"));
    client
}

/// One scenario: a fresh namespace `e2e-<name>`, the operator installed, figures to report.
pub struct Scenario {
    pub name: &'static str,
    pub client: Client,
    pub ns: String,
    started: Instant,
    figures: Mutex<Vec<(String, String)>>,
}

impl Scenario {
    /// Installs the operator if this process has not yet, and gives the scenario a namespace
    /// of its own, emptied of what an earlier run left.
    pub async fn begin(name: &'static str) -> Self {
        let client = client().await;
        operator::ensure(&client).await;
        let ns = format!("e2e-{name}");
        if operator::KEYS_NAMESPACES.contains(&ns.as_str()) {
            // The chart's Role lives there: empty it instead of deleting it.
            empty_namespace(&client, &ns).await;
        } else {
            delete_namespace(&client, &ns).await;
        }
        ensure_namespace(&client, &ns).await;
        println!("== scenario {name} (namespace {ns})");
        Self {
            name,
            client,
            ns,
            started: Instant::now(),
            figures: Mutex::new(vec![]),
        }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Prints a figure and keeps it for the summary (`target/e2e-figures.txt`).
    pub fn figure(&self, key: &str, value: impl Display) {
        let value = value.to_string();
        println!("FIGURE {} {key} = {value}", self.name);
        if let Ok(mut figures) = self.figures.lock() {
            figures.push((key.to_owned(), value));
        }
    }

    /// A duration figure, in seconds with one decimal.
    pub fn seconds(&self, key: &str, took: Duration) {
        self.figure(&format!("{key} (s)"), format!("{:.1}", took.as_secs_f64()));
    }

    /// The figures of a finished traffic run: its summary, requests sent and failed.
    pub fn traffic(&self, what: &str, tally: &traffic::Tally) {
        self.figure(what, tally.summary());
        self.figure(&format!("{what}: requests sent"), tally.sent);
        self.figure(&format!("{what}: requests failed"), tally.failed());
    }

    /// Server-side applies `object` (a JSON manifest) in the scenario's namespace.
    pub async fn apply<K>(&self, object: serde_json::Value) -> K
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Serialize
            + std::fmt::Debug,
    {
        let object: K = serde_json::from_value(object).expect("a manifest of the kind");
        let name = object.meta().name.clone().expect("a name");
        self.api::<K>()
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await
            .unwrap_or_else(|e| panic!("applying {} {name}: {e}", K::kind(&())))
    }

    /// Deletes the namespace (what the scenario made goes with it) and records the figures.
    pub async fn end(self) {
        let elapsed = self.started.elapsed();
        self.figure("scenario seconds", format!("{:.1}", elapsed.as_secs_f64()));
        if operator::KEYS_NAMESPACES.contains(&self.ns.as_str()) {
            empty_namespace(&self.client, &self.ns).await;
        } else {
            let _ = Api::<Namespace>::all(self.client.clone())
                .delete(&self.ns, &DeleteParams::background())
                .await;
        }
        let figures = self.figures.lock().map(|f| f.clone()).unwrap_or_default();
        record_figures(self.name, &figures);
        println!("== scenario {} passed in {elapsed:.1?}", self.name);
    }
}

fn record_figures(scenario: &str, figures: &[(String, String)]) {
    let path = std::env::var("KASMINA_E2E_FIGURES").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/e2e-figures.txt").to_owned()
    });
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        for (key, value) in figures {
            let _ = writeln!(file, "{scenario}\t{key}\t{value}");
        }
    }
}

pub async fn ensure_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kasmina.dev/e2e": "true"}}
    }))
    .expect("a Namespace");
    api.patch(name, &PatchParams::apply(MANAGER), &Patch::Apply(&ns))
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
}

/// Deletes a namespace and waits until it is gone (a terminating namespace refuses objects).
async fn delete_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    if api.get_opt(name).await.ok().flatten().is_none() {
        return;
    }
    let _ = api.delete(name, &DeleteParams::background()).await;
    wait_gone(api, name, Duration::from_secs(120)).await;
}

/// Deletes the Kasmina objects of a namespace that outlives scenarios, and waits for their
/// children to go.
async fn empty_namespace(client: &Client, ns: &str) {
    use kasmina::api::{EdgeDeployment, ScalingPolicy};
    let lp = ListParams::default();
    let eds: Api<EdgeDeployment> = Api::namespaced(client.clone(), ns);
    let sps: Api<ScalingPolicy> = Api::namespaced(client.clone(), ns);
    let _ = sps
        .delete_collection(&DeleteParams::background(), &lp)
        .await;
    let _ = eds
        .delete_collection(&DeleteParams::background(), &lp)
        .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while eds
        .list(&lp)
        .await
        .map(|l| !l.items.is_empty())
        .unwrap_or(false)
    {
        assert!(
            Instant::now() < deadline,
            "EdgeDeployments of {ns} not deleted in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits up to `within` for `check` to hold on the named object, and returns it.
pub async fn wait<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    within: Duration,
    check: impl Fn(&K) -> bool,
) -> K
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug + Send + 'static,
{
    let condition = move |obj: Option<&K>| obj.is_some_and(&check);
    match tokio::time::timeout(within, await_condition(api.clone(), name, condition)).await {
        Ok(Ok(Some(object))) => object,
        Ok(Ok(None)) => panic!("{name}: gone while waiting for {what}"),
        Ok(Err(e)) => panic!("{name}: watching for {what}: {e}"),
        Err(_) => {
            let last = api.get_opt(name).await.ok().flatten();
            panic!(
                "{name}: {what} did not happen within {within:?}; last seen: {}",
                describe(last.as_ref())
            )
        }
    }
}

/// Waits up to `within` for the named object to be gone.
pub async fn wait_gone<K>(api: Api<K>, name: &str, within: Duration)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let gone = |obj: Option<&K>| obj.is_none();
    if tokio::time::timeout(within, await_condition(api, name, gone))
        .await
        .is_err()
    {
        panic!("{name}: still there after {within:?}");
    }
}

/// The status (or the whole object) of a last-seen object, for failure messages.
fn describe<K: Serialize>(object: Option<&K>) -> String {
    let Some(object) = object else {
        return "absent".into();
    };
    let value = serde_json::to_value(object).unwrap_or_default();
    let shown = value.get("status").unwrap_or(&value);
    serde_json::to_string_pretty(shown).unwrap_or_default()
}

/// Polls `probe` every 250 ms until it returns Some, for at most `within`.
pub async fn until<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if let Some(found) = probe().await {
            return found;
        }
        assert!(Instant::now() < deadline, "{what} within {within:?}");
    }
}

/// The Events regarding the named object, oldest first.
pub async fn events(client: &Client, ns: &str, kind: &str, name: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let mut events: Vec<Event> = api
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e.regarding
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name))
        })
        .collect();
    events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    events
}

/// Waits for an Event of `reason` about the named object; returns its note.
pub async fn event(
    client: &Client,
    ns: &str,
    kind: &str,
    name: &str,
    reason: &str,
    within: Duration,
) -> String {
    until(
        &format!("an Event {reason} on {kind} {name}"),
        within,
        || async {
            events(client, ns, kind, name)
                .await
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(reason))
                .map(|e| e.note.unwrap_or_default())
        },
    )
    .await
}

/// The outcome of a command.
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args` with `stdin`, as a user would at a shell.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .env("PATH", path_with_plugin())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .unwrap_or_else(|e| panic!("writing to {program}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `kubectl args`, which must succeed.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> String {
    let out = run("kubectl", args, stdin);
    assert!(
        out.ok,
        "kubectl {}: {}{}",
        args.join(" "),
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// PATH with the folder of the freshly built `kubectl-kasmina`, so `kubectl kasmina` finds it.
fn path_with_plugin() -> String {
    let plugin = std::path::Path::new(env!("CARGO_BIN_EXE_kubectl-kasmina"));
    let dir = plugin.parent().map(|p| p.display().to_string());
    let path = std::env::var("PATH").unwrap_or_default();
    match dir {
        Some(dir) => format!("{dir}:{path}"),
        None => path,
    }
}
