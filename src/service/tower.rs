//! The tower impls (feature `tower`): [`SessionLayer`] as a [`tower_layer::Layer`] and
//! [`SessionService`] as a [`tower_service::Service`], with the behaviour of the hyper path.

use std::task::{Context, Poll};

use http::{Request, Response};

use super::{ResponseFuture, SessionLayer, SessionService, attach};

/// Makes [`SessionService`]s, for `tower::ServiceBuilder` stacks and axum's `Router::layer`.
///
/// # Examples
/// ```
/// use std::convert::Infallible;
///
/// use http::{Request, Response};
/// use hyper_sessions::{MemoryStore, Session, SessionLayer};
/// use tower::{ServiceBuilder, service_fn};
///
/// let service = ServiceBuilder::new()
///     .layer(SessionLayer::new(MemoryStore::default()))
///     .service(service_fn(|req: Request<String>| async move {
///         let session = Session::from_request(&req).expect("layer installed");
///         let _ = session;
///         Ok::<_, Infallible>(Response::new(String::new()))
///     }));
/// # let _ = service;
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
impl<S> tower_layer::Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.wrap(inner)
    }
}

/// The same behaviour as the hyper `Service` impl: the session is attached before the inner
/// service is called, loaded lazily, and saved after it answered, with the same error handler.
///
/// `poll_ready` is the inner service's. `call` hands the request to the instance that was
/// polled ready and keeps a fresh clone for the next `poll_ready`, so readiness reserved by the
/// inner service (a concurrency permit, a buffer slot) is used by this request and not lost.
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
impl<S, ReqBody, ResBody> tower_service::Service<Request<ReqBody>> for SessionService<S>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let session = attach(&self.shared, &mut req);
        // The instance that was polled ready serves this request; the clone waits for the next
        // `poll_ready`.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(inner.call(req), session)
    }
}
