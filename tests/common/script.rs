//! A test app whose requests are scripts of session calls, with park points: a request can be
//! held between its load and its commit while others run, and released when the test says.
//!
//! A path is a list of steps, `/get:a/set:b=1/park:A/...`:
//! `get:k` (answers the value or `-`), `take:k` (`take_flash`: the flash or `-`), `set:k=v`,
//! `flash:k=v`, `remove:k`, `clear`, `incr:k`
//! (an `update` adding one; answers the new value), `inactive:ms` / `browser:ms` (the
//! session's own expiry: `OnInactivity` / `OnSessionEnd`), `reset` (`reset_expiry`), `cycle`,
//! `destroy`, `keys` (answers them, comma-separated), `id` (answers the id or `-`),
//! `owner:name`, `label:text`, `sessions` (answers how many the owner has), `others`
//! (`revoke_others`: answers how many), `sleep:ms` and `park:name`. The body is the answers, space-separated. A step that fails stops the
//! script with a 500 whose body names the error (`gone`, `destroyed`, `conflict`, `store`,
//! `other`); a failed save after the script is the layer's own empty 500/503.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_sessions::{Error, Expiry, Session, SessionLayer};
use tokio::sync::oneshot;

use super::model::{Change, Log, REQUEST, expiry_value, log_change};
use super::{Conn, Resp, TestServer, serve_service};

/// A request held at a park point.
pub struct Parked {
    arrived: oneshot::Receiver<()>,
    release: oneshot::Sender<()>,
}

impl Parked {
    /// Waits until the request reached its park point (it has loaded its session).
    pub async fn arrived(&mut self) {
        tokio::time::timeout(Duration::from_secs(10), &mut self.arrived)
            .await
            .expect("the request never reached its park point")
            .expect("the request dropped its park point");
    }

    /// Lets the request go on to its commit.
    pub fn release(self) {
        let _ = self.release.send(());
    }
}

type Slot = (Option<oneshot::Sender<()>>, Option<oneshot::Receiver<()>>);

/// The script app behind a layer, on a free loopback port.
pub struct ScriptServer {
    pub addr: SocketAddr,
    parks: Arc<Mutex<HashMap<String, Slot>>>,
    _server: TestServer,
}

impl ScriptServer {
    pub async fn start(layer: &SessionLayer) -> ScriptServer {
        ScriptServer::start_with(layer, None).await
    }

    /// The script app for the model check: a path starting `/req:N` is request `N`, whose
    /// changes and store operations go to `log` (see `model.rs`).
    pub async fn start_modelled(layer: &SessionLayer, log: Log) -> ScriptServer {
        ScriptServer::start_with(layer, Some(log)).await
    }

    async fn start_with(layer: &SessionLayer, log: Option<Log>) -> ScriptServer {
        let parks: Arc<Mutex<HashMap<String, Slot>>> = Arc::default();
        let app_parks = parks.clone();
        let inner = layer.wrap(hyper::service::service_fn(move |req: Request<Incoming>| {
            let parks = app_parks.clone();
            async move { Ok::<_, Infallible>(run(req, &parks).await) }
        }));
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let tag = req
                .uri()
                .path()
                .strip_prefix("/req:")
                .and_then(|rest| rest.split('/').next()?.parse::<u32>().ok());
            let call = hyper::service::Service::call(&inner, req);
            let log = log.clone();
            async move {
                match (tag, log) {
                    (Some(tag), Some(log)) => REQUEST.scope((tag, log), call).await,
                    _ => call.await,
                }
            }
        });
        let server = serve_service(service).await;
        ScriptServer {
            addr: server.addr,
            parks,
            _server: server,
        }
    }

    /// Runs `parked` (steps, then a park) with `cookie` and, while it is parked after its
    /// steps, `meanwhile` with the same cookie to completion; then lets `parked` finish.
    /// Answers both responses.
    pub async fn race(&self, cookie: &str, parked: &str, meanwhile: &str) -> (Resp, Resp) {
        let mut park = self.park("race");
        let (addr, cookie, parked) = (self.addr, cookie.to_owned(), format!("{parked}/park:race"));
        let first = {
            let cookie = cookie.clone();
            tokio::spawn(async move { Conn::http1(addr).await.get(&parked, Some(&cookie)).await })
        };
        park.arrived().await;
        let second = Conn::http1(addr).await.get(meanwhile, Some(&cookie)).await;
        park.release();
        (first.await.unwrap(), second)
    }

    /// Sets up the park point `name`: the next request that reaches it waits there.
    pub fn park(&self, name: &str) -> Parked {
        let (arrived_tx, arrived) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        self.parks
            .lock()
            .unwrap()
            .insert(name.to_owned(), (Some(arrived_tx), Some(release_rx)));
        Parked { arrived, release }
    }
}

fn kind(e: &Error) -> &'static str {
    if e.is_gone() {
        "gone"
    } else if e.is_destroyed() {
        "destroyed"
    } else if e.is_conflict() {
        "conflict"
    } else if e.is_store() {
        "store"
    } else {
        "other"
    }
}

async fn run(
    req: Request<Incoming>,
    parks: &Mutex<HashMap<String, Slot>>,
) -> Response<Full<Bytes>> {
    let session = Session::from_request(&req).expect("the layer is installed");
    let path = req.uri().path().to_owned();
    let mut answers = Vec::new();
    for step in path.split('/').filter(|s| !s.is_empty()) {
        match step_once(&session, step, parks).await {
            Ok(Some(answer)) => answers.push(answer),
            Ok(None) => {}
            Err(e) => {
                let mut resp = Response::new(Full::new(Bytes::from(kind(&e))));
                *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                return resp;
            }
        }
    }
    Response::new(Full::new(Bytes::from(answers.join(" "))))
}

fn ms(arg: &str) -> Duration {
    Duration::from_millis(arg.parse().expect("milliseconds"))
}

async fn step_once(
    session: &Session,
    step: &str,
    parks: &Mutex<HashMap<String, Slot>>,
) -> Result<Option<String>, Error> {
    let (verb, arg) = step.split_once(':').unwrap_or((step, ""));
    let (key, value) = arg.split_once('=').unwrap_or((arg, ""));
    match verb {
        "get" => {
            let value = session.get::<String>(key).await?;
            Ok(Some(value.unwrap_or_else(|| "-".to_owned())))
        }
        "take" => {
            let value = session.take_flash::<String>(key).await?;
            if let Some(v) = &value {
                log_change(Change::TakeFlash(key.to_owned(), v.clone()));
            }
            Ok(Some(value.unwrap_or_else(|| "-".to_owned())))
        }
        "set" => {
            session.insert(key, value).await?;
            log_change(Change::Set(key.to_owned(), value.to_owned()));
            Ok(None)
        }
        "flash" => {
            session.flash(key, value).await?;
            log_change(Change::Flash(key.to_owned(), value.to_owned()));
            Ok(None)
        }
        "remove" => {
            if session.remove(key).await? {
                log_change(Change::Remove(key.to_owned()));
            }
            Ok(None)
        }
        "clear" => {
            session.clear().await?;
            log_change(Change::Clear);
            Ok(None)
        }
        "incr" => {
            // Logged first: `update` saves at once.
            log_change(Change::Incr(key.to_owned()));
            let n: u64 = session
                .update(key, |n: Option<u64>| n.unwrap_or(0) + 1)
                .await?;
            Ok(Some(n.to_string()))
        }
        "inactive" | "browser" => {
            let expiry = if verb == "inactive" {
                Expiry::OnInactivity(ms(arg))
            } else {
                Expiry::OnSessionEnd(ms(arg))
            };
            session.set_expiry(expiry).await?;
            log_change(Change::Expiry(Some(expiry_value(expiry))));
            Ok(None)
        }
        "reset" => {
            session.reset_expiry().await?;
            log_change(Change::Expiry(None));
            Ok(None)
        }
        "req" => Ok(None),
        "cycle" => session.cycle_id().await.map(|()| None),
        "destroy" => {
            session.destroy().await?;
            log_change(Change::Destroyed);
            Ok(None)
        }
        "keys" => Ok(Some(session.keys().await?.join(","))),
        "owner" => session.set_owner(arg).await.map(|()| None),
        "label" => session.set_label(arg).await.map(|()| None),
        "sessions" => Ok(Some(session.owner_sessions().await?.len().to_string())),
        "others" => Ok(Some(session.revoke_others().await?.to_string())),
        "id" => {
            // Loaded first, as the other steps do.
            session.contains("").await?;
            Ok(Some(
                session
                    .id()
                    .map_or_else(|| "-".to_owned(), |id| id.to_string()),
            ))
        }
        "sleep" => {
            tokio::time::sleep(ms(arg)).await;
            Ok(None)
        }
        "park" => {
            let slot = parks.lock().unwrap().remove(arg);
            if let Some((arrived, release)) = slot {
                if let Some(arrived) = arrived {
                    let _ = arrived.send(());
                }
                if let Some(release) = release {
                    let _ = release.await;
                }
            }
            Ok(None)
        }
        other => panic!("unknown script step {other:?}"),
    }
}
