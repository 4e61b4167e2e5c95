//! A model-based check of the whole lifecycle: many runs of 2-8 concurrent requests on one
//! session, each a random script of session calls with a random pause between its load and its
//! commit, on a real store; then the run is checked against a sequential model.
//!
//! The store is wrapped so that every operation is logged, in the order the store applied it,
//! with the request that made it; the script app logs each change a request makes, in the same
//! log. Replaying the log through the model checks, write by write: every write is based on the
//! latest version (no acknowledged write is lost), holds exactly the writing request's changes
//! replayed on the record it last loaded (increments exact, a flash removed only as it was
//! read), every load returns what the model holds; a session destroyed while a cycle was moving
//! it never reappears under any id; every acknowledged request's changes were all written; and
//! the store ends holding exactly the model's records. On failure the seed is printed;
//! `MODEL_SEED=<seed>` replays that run, `MODEL_RUNS=<n>` runs more.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hyper::StatusCode;
use hyper_sessions::store::{CreateOutcome, Key, Record, SaveOutcome, SessionStore, StoreError};
use hyper_sessions::{Expiry, SessionLayer};
use serde_json::Value;

use super::Conn;
use super::script::ScriptServer;

/// A change a request made, as the model applies it.
#[derive(Debug, Clone)]
pub enum Change {
    Set(String, String),
    Flash(String, String),
    Remove(String),
    TakeFlash(String, String),
    Clear,
    Incr(String),
    Expiry(Option<Value>),
    /// `destroy` returned: nothing of the request's is to be written any more.
    Destroyed,
}

/// One line of the log.
#[derive(Debug, Clone)]
pub enum Event {
    Change(u32, Change),
    Load(u32, Key, Option<Record>),
    Create(u32, Record, CreateOutcome),
    Save(u32, Record, u64, SaveOutcome),
    Touch(u32, Key, u64, SaveOutcome),
    Remove(u32, Key, u64, SaveOutcome),
    Delete(u32, Key),
}

/// The shared log, and the request each task works for.
pub type Log = Arc<Mutex<Vec<Event>>>;

tokio::task_local! {
    /// The request a task serves, and the log it writes to (set by the script server).
    pub static REQUEST: (u32, Log);
}

/// Logs a change of the current request, if it is being modelled.
pub fn log_change(change: Change) {
    let _ = REQUEST.try_with(|(req, log)| log.lock().unwrap().push(Event::Change(*req, change)));
}

/// A store that logs every operation it applies, one at a time, in the order applied.
#[derive(Clone)]
pub struct Logged<S> {
    inner: S,
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
    log: Log,
}

impl<S> Logged<S> {
    pub fn new(inner: S, log: Log) -> Self {
        Logged {
            inner,
            one_at_a_time: Arc::default(),
            log,
        }
    }

    fn push(&self, event: impl FnOnce(u32) -> Event) {
        let req = REQUEST.try_with(|(req, _)| *req).unwrap_or(u32::MAX);
        self.log.lock().unwrap().push(event(req));
    }
}

impl<S: SessionStore> SessionStore for Logged<S> {
    async fn load(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let _one = self.one_at_a_time.lock().await;
        let got = self.inner.load(key).await?;
        self.push(|r| Event::Load(r, *key, got.clone()));
        Ok(got)
    }
    async fn create(&self, record: &Record) -> Result<CreateOutcome, StoreError> {
        let _one = self.one_at_a_time.lock().await;
        let outcome = self.inner.create(record).await?;
        self.push(|r| Event::Create(r, record.clone(), outcome));
        Ok(outcome)
    }
    async fn save(&self, record: &Record, expected: u64) -> Result<SaveOutcome, StoreError> {
        let _one = self.one_at_a_time.lock().await;
        let outcome = self.inner.save(record, expected).await?;
        self.push(|r| Event::Save(r, record.clone(), expected, outcome));
        Ok(outcome)
    }
    async fn touch(
        &self,
        key: &Key,
        expected: u64,
        expires_at: SystemTime,
    ) -> Result<SaveOutcome, StoreError> {
        let _one = self.one_at_a_time.lock().await;
        let outcome = self.inner.touch(key, expected, expires_at).await?;
        self.push(|r| Event::Touch(r, *key, expected, outcome));
        Ok(outcome)
    }
    async fn remove(&self, key: &Key, expected: u64) -> Result<SaveOutcome, StoreError> {
        let _one = self.one_at_a_time.lock().await;
        let outcome = self.inner.remove(key, expected).await?;
        self.push(|r| Event::Remove(r, *key, expected, outcome));
        Ok(outcome)
    }
    async fn delete(&self, key: &Key) -> Result<(), StoreError> {
        let _one = self.one_at_a_time.lock().await;
        self.inner.delete(key).await?;
        self.push(|r| Event::Delete(r, *key));
        Ok(())
    }
    async fn owned(&self, owner: &str) -> Result<Vec<Record>, StoreError> {
        self.inner.owned(owner).await
    }
}

/// A session's data as the model sees it: values, flash keys, own expiry policy.
#[derive(Debug, Clone, Default, PartialEq)]
struct Data {
    values: BTreeMap<String, Value>,
    flash: BTreeSet<String>,
    expiry: Option<Value>,
}

impl Data {
    fn of(record: &Record) -> Data {
        let v: Value = serde_json::from_slice(record.data()).expect("a record the layer wrote");
        Data {
            values: v["d"]
                .as_object()
                .expect("values")
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            flash: v
                .get("f")
                .and_then(Value::as_array)
                .map(|f| f.iter().map(|k| k.as_str().unwrap().to_owned()).collect())
                .unwrap_or_default(),
            expiry: v.get("x").cloned(),
        }
    }

    fn apply(&mut self, change: &Change) {
        match change {
            Change::Set(k, v) => {
                self.values.insert(k.clone(), Value::from(v.as_str()));
                self.flash.remove(k);
            }
            Change::Flash(k, v) => {
                self.values.insert(k.clone(), Value::from(v.as_str()));
                self.flash.insert(k.clone());
            }
            Change::Remove(k) => {
                self.values.remove(k);
                self.flash.remove(k);
            }
            Change::TakeFlash(k, v) => {
                if self.flash.contains(k) && self.values.get(k) == Some(&Value::from(v.as_str())) {
                    self.values.remove(k);
                    self.flash.remove(k);
                }
            }
            Change::Clear => {
                self.values.clear();
                self.flash.clear();
            }
            Change::Incr(k) => {
                let n = self.values.get(k).and_then(Value::as_u64).unwrap_or(0);
                self.values.insert(k.clone(), Value::from(n + 1));
            }
            Change::Expiry(x) => self.expiry.clone_from(x),
            Change::Destroyed => {}
        }
    }

    fn with(&self, changes: &[Change]) -> Data {
        let mut data = self.clone();
        for c in changes {
            data.apply(c);
        }
        data
    }
}

/// What the model knows of one request.
#[derive(Default)]
struct Req {
    /// Changes made since its last complete write.
    pending: Vec<Change>,
    /// The data its next write is based on: its last load, or its own last write.
    base: Data,
    /// The record that data is: what it last loaded, or last wrote.
    stored: Option<Key>,
    /// A cycle under way: the old id, still to be removed.
    moving_from: Option<Key>,
    /// The record a cycle created.
    moved_to: Option<Key>,
    /// The old record was destroyed before the move completed.
    doomed: bool,
    destroyed: bool,
}

/// Whether a conditional write's outcome fits the model's version of the record.
fn fits(outcome: SaveOutcome, model: Option<u64>, expected: u64) -> bool {
    match outcome {
        SaveOutcome::Saved => model == Some(expected),
        SaveOutcome::Conflict => model.is_some_and(|v| v != expected),
        _ => model.is_none(),
    }
}

/// Replays `log` through the model; answers the model's records, or what went wrong.
#[allow(clippy::too_many_lines)] // one replay, read top to bottom
fn replay(log: &[Event], acked: &HashMap<u32, bool>) -> Result<HashMap<Key, (u64, Data)>, String> {
    let mut records: HashMap<Key, (u64, Data)> = HashMap::new();
    let mut reqs: HashMap<u32, Req> = HashMap::new();
    for (at, event) in log.iter().enumerate() {
        let fail = |what: String| Err(format!("event {at} {event:?}: {what}"));
        match event {
            Event::Change(r, Change::Destroyed) => {
                let req = reqs.entry(*r).or_default();
                req.pending.clear();
                req.destroyed = true;
            }
            Event::Change(r, c) => reqs.entry(*r).or_default().pending.push(c.clone()),
            Event::Load(r, id, got) => {
                let model = records.get(id);
                match (got, model) {
                    (None, None) => {}
                    (Some(rec), Some((v, d))) if rec.version() == *v && Data::of(rec) == *d => {}
                    _ => return fail(format!("loaded {got:?}, the model holds {model:?}")),
                }
                let req = reqs.entry(*r).or_default();
                req.base = got.as_ref().map(Data::of).unwrap_or_default();
                if req.moving_from.is_none() {
                    req.stored = got.as_ref().map(Record::key);
                }
            }
            Event::Create(r, rec, outcome) => {
                if *outcome != CreateOutcome::Created {
                    continue;
                }
                let req = reqs.entry(*r).or_default();
                let want = req.base.with(&req.pending);
                if Data::of(rec) != want {
                    return fail(format!(
                        "created {:?}, the model says {want:?}",
                        Data::of(rec)
                    ));
                }
                records.insert(rec.key(), (1, want.clone()));
                // A create by a request whose session is stored starts a move.
                match req.stored.filter(|id| records.contains_key(id)) {
                    Some(old) if req.moving_from.is_none() => {
                        req.moving_from = Some(old);
                        req.moved_to = Some(rec.key());
                    }
                    _ => req.pending.clear(),
                }
                req.base = want;
                req.stored = Some(rec.key());
            }
            Event::Save(r, rec, expected, outcome) => {
                let model = records.get(&rec.key()).map(|(v, _)| *v);
                if !fits(*outcome, model, *expected) {
                    return fail(format!("the model's version is {model:?}"));
                }
                if *outcome != SaveOutcome::Saved {
                    continue;
                }
                let req = reqs.entry(*r).or_default();
                let want = req.base.with(&req.pending);
                if Data::of(rec) != want {
                    return fail(format!(
                        "saved {:?}, the model says {want:?}",
                        Data::of(rec)
                    ));
                }
                records.insert(rec.key(), (expected + 1, want.clone()));
                if req.moving_from.is_none() {
                    req.pending.clear();
                }
                req.base = want;
            }
            Event::Touch(_, id, expected, outcome) | Event::Remove(_, id, expected, outcome) => {
                let model = records.get(id).map(|(v, _)| *v);
                if !fits(*outcome, model, *expected) {
                    return fail(format!("the model's version is {model:?}"));
                }
                if let (Event::Remove(r, ..), SaveOutcome::Missing) = (event, outcome) {
                    // Emptying a session someone else destroyed: what it meant to do is done.
                    let req = reqs.entry(*r).or_default();
                    if req.moving_from.is_none() && req.base.with(&req.pending).values.is_empty() {
                        req.pending.clear();
                    }
                }
                if let (Event::Remove(r, ..), SaveOutcome::Saved) = (event, outcome) {
                    let req = reqs.entry(*r).or_default();
                    if req.moving_from == Some(*id) {
                        req.moving_from = None;
                    } else if !req.base.with(&req.pending).values.is_empty() {
                        return fail("removed a session that was not empty".to_owned());
                    }
                    req.pending.clear();
                    records.remove(id);
                }
            }
            Event::Delete(r, id) => {
                records.remove(id);
                for req in reqs.values_mut() {
                    if req.moving_from == Some(*id) {
                        req.doomed = true;
                    }
                }
                let req = reqs.entry(*r).or_default();
                req.pending.clear();
                req.destroyed = true;
            }
        }
    }
    for (r, req) in &reqs {
        if req.doomed
            && let Some(to) = req.moved_to
            && records.contains_key(&to)
        {
            return Err(format!(
                "request {r}: a session destroyed while it was being moved came back"
            ));
        }
        let want = req.base.with(&req.pending);
        // An empty new session is never stored, whatever its policy.
        let unstored_and_empty = req.stored.is_none() && want.values.is_empty();
        if acked.get(r) == Some(&true) && !req.destroyed && want != req.base && !unstored_and_empty
        {
            return Err(format!(
                "request {r} was acknowledged, but these changes were never written: {:?}",
                req.pending
            ));
        }
    }
    Ok(records)
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random step of a script; `unique` makes every written value distinct.
fn random_step(rng: &mut Rng, unique: &mut u64) -> String {
    *unique += 1;
    let k = rng.below(3);
    let f = rng.below(2);
    match rng.below(100) {
        0..15 => format!("get:k{k}"),
        15..32 => format!("set:k{k}=v{unique}"),
        32..40 => format!("remove:k{k}"),
        40..58 => "incr:n".to_owned(),
        58..68 => format!("flash:f{f}=m{unique}"),
        68..78 => format!("take:f{f}"),
        78..82 => "clear".to_owned(),
        82..87 => format!("inactive:{}", 100_000 + rng.below(1000)),
        87..90 => "reset".to_owned(),
        90..96 => "cycle".to_owned(),
        _ => "destroy".to_owned(),
    }
}

/// One run: a session, then 2-8 concurrent scripted requests on it, then the check.
async fn run_once<S: SessionStore + Clone>(store: &S, seed: u64) -> Result<(), String> {
    let log: Log = Arc::default();
    let layer = SessionLayer::new(Logged::new(store.clone(), log.clone()));
    let server = ScriptServer::start_modelled(&layer, log.clone()).await;
    let mut rng = Rng(seed);
    let mut unique = 0;
    let setup = Conn::http1(server.addr)
        .await
        .get("/req:0/set:k0=start/incr:n/flash:f0=hello", None)
        .await;
    let cookie = setup
        .cookie_pair()
        .ok_or("the setup request set no cookie")?;
    let n = 2 + rng.below(7);
    let mut tasks = Vec::new();
    for req in 1..=n {
        let mut path = format!("/req:{req}");
        let steps = 1 + rng.below(4);
        let pause_after = rng.below(steps);
        for i in 0..steps {
            path.push('/');
            path.push_str(&random_step(&mut rng, &mut unique));
            if i == pause_after {
                path.push_str("/sleep:");
                path.push_str(&rng.below(15).to_string());
            }
        }
        let start = Duration::from_millis(rng.below(10));
        let addr = server.addr;
        let cookie = cookie.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(start).await;
            let r = Conn::http1(addr).await.get(&path, Some(&cookie)).await;
            (req, path, r.status)
        }));
    }
    let mut acked = HashMap::from([(0, true)]);
    let mut outcomes = Vec::new();
    for t in tasks {
        let (req, path, status) = t.await.unwrap();
        acked.insert(u32::try_from(req).unwrap(), status == StatusCode::OK);
        outcomes.push(format!("{req} {path} -> {status}"));
    }
    let log = log.lock().unwrap().clone();
    let describe =
        |what: String| format!("{what}\nrequests:\n{}\nlog:\n{log:#?}", outcomes.join("\n"));
    let records = replay(&log, &acked).map_err(describe)?;
    // The store holds exactly what the model holds.
    for (id, (version, data)) in &records {
        let rec = store.load(id).await.unwrap();
        match rec {
            Some(rec) if rec.version() == *version && Data::of(&rec) == *data => {}
            other => {
                return Err(describe(format!(
                    "the store holds {other:?} for {version} {data:?}"
                )));
            }
        }
    }
    for event in &log {
        if let Event::Create(_, rec, CreateOutcome::Created) = event
            && !records.contains_key(&rec.key())
            && store.load(&rec.key()).await.unwrap().is_some()
        {
            return Err(describe(
                "a record the model removed is still stored".to_owned(),
            ));
        }
    }
    Ok(())
}

/// The model check: `MODEL_RUNS` runs (default 60 per store), or the one `MODEL_SEED`.
pub async fn model_check<S: SessionStore + Clone>(store: S) {
    let runs: u64 = std::env::var("MODEL_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(60);
    let seeds: Vec<u64> = if let Some(seed) = std::env::var("MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        vec![seed]
    } else {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        let base = now.as_secs().rotate_left(32) ^ u64::from(now.subsec_nanos());
        (0..runs)
            .map(|i| base.wrapping_add(i.wrapping_mul(0x9e37_79b9)))
            .collect()
    };
    for seed in &seeds {
        if let Err(e) = run_once(&store, *seed).await {
            panic!("model check failed; replay with MODEL_SEED={seed}\n{e}");
        }
    }
    eprintln!("model check: {} runs passed", seeds.len());
}

/// An expiry policy as the record keeps it.
pub fn expiry_value(expiry: Expiry) -> Value {
    serde_json::to_value(expiry).unwrap()
}
