//! The `tracing` feature: a span per store operation, with the store, the operation, the
//! commit's attempt, the outcome and the latency; the layer's events as `tracing` events; never
//! a session id, store key or session data in either.

mod common;

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use common::Browser;
use common::script::ScriptServer;
use hyper::StatusCode;
use hyper_sessions::store::Key;
use hyper_sessions::{MemoryStore, SessionLayer};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

/// The fields of every store span, by span, and every event's fields, as text.
#[derive(Default)]
struct Seen {
    spans: HashMap<u64, Vec<(String, String)>>,
    order: Vec<u64>,
    events: Vec<String>,
}

static SEEN: Mutex<Option<Seen>> = Mutex::new(None);

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

struct Capture;

impl<S: Subscriber> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() != "hyper_sessions::store" {
            return;
        }
        let mut fields = Vec::new();
        attrs.record(&mut Fields(&mut fields));
        let mut seen = SEEN.lock().unwrap();
        let seen = seen.get_or_insert_with(Seen::default);
        seen.spans.insert(id.into_u64(), fields);
        seen.order.push(id.into_u64());
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut seen = SEEN.lock().unwrap();
        let Some(fields) = seen.as_mut().and_then(|s| s.spans.get_mut(&id.into_u64())) else {
            return;
        };
        values.record(&mut Fields(fields));
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        let text = fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut seen = SEEN.lock().unwrap();
        seen.get_or_insert_with(Seen::default).events.push(text);
    }
}

/// The store spans since the last call, as `op:outcome@attempt`, each checked for a latency
/// and the store's name.
fn spans() -> Vec<String> {
    let mut seen = SEEN.lock().unwrap();
    let seen = seen.get_or_insert_with(Seen::default);
    let order = std::mem::take(&mut seen.order);
    order
        .iter()
        .map(|id| {
            let fields: HashMap<&str, &str> = seen.spans[id]
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(fields.get("store"), Some(&"MemoryStore"), "{fields:?}");
            assert!(
                fields
                    .get("latency_us")
                    .is_some_and(|l| l.parse::<u64>().is_ok()),
                "{fields:?}"
            );
            format!(
                "{}:{}@{}",
                fields["op"], fields["outcome"], fields["attempt"]
            )
        })
        .collect()
}

/// Everything the spans and events said, as text.
fn everything_said() -> String {
    let seen = SEEN.lock().unwrap();
    let seen = seen.as_ref().unwrap();
    let mut text = seen.events.join("\n");
    for fields in seen.spans.values() {
        for (k, v) in fields {
            text.extend(["\n", k, "=", v]);
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_operations_are_spans_and_say_nothing_secret() {
    tracing_subscriber::registry().with(Capture).init();
    let server = ScriptServer::start(&SessionLayer::new(MemoryStore::default())).await;
    let mut browser = Browser::new(server.addr).await;

    browser.get("/set:secret=v4lue-one").await;
    assert_eq!(spans(), ["create:created@1"], "a new session is one create");
    browser.get("/get:secret").await;
    assert_eq!(spans(), ["load:found@1"], "a read is one load");
    browser.get("/set:secret=v4lue-two").await;
    assert_eq!(spans(), ["load:found@1", "save:saved@1"]);

    // A write parked between its load and its commit while another saves: its save conflicts,
    // the record is loaded again, and the second attempt saves.
    let cookie = browser.cookie.clone().unwrap();
    let (parked, meanwhile) = server
        .race(&cookie, "/set:a=v4lue-three", "/set:b=v4lue-four")
        .await;
    assert_eq!(
        (parked.status, meanwhile.status),
        (StatusCode::OK, StatusCode::OK)
    );
    let mut ops = spans();
    ops.sort();
    assert_eq!(
        ops,
        [
            "load:found@1",
            "load:found@1",
            "load:found@2",
            "save:conflict@1",
            "save:saved@1",
            "save:saved@2"
        ]
    );

    let said = everything_said();
    let id = browser.id().unwrap();
    let key = Key::of(id).to_hex();
    for secret in [
        id.to_string(),
        id.to_string().replace('-', ""),
        key,
        "v4lue".to_owned(),
    ] {
        assert!(!said.contains(&secret), "{secret} in {said}");
    }
    assert!(
        said.contains("store operation"),
        "the completion events: {said}"
    );
}
