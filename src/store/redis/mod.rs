//! The Redis family: [`RedisStore`](crate::RedisStore) (the `redis` crate, feature `redis`) and
//! [`WebdisStore`](crate::WebdisStore) (Redis over HTTP through Webdis, feature `webdis`).
//!
//! One protocol ([`protocol`]: commands, scripts, replies, errors, lost-reply rules) on one
//! stored layout ([`value`]), over two transports: [`conn`] (the store's own RESP connections to
//! a single node, [`pipe`] and [`resp`], or the `redis` crate's) and [`webdis`]. A
//! `RedisStore` and a `WebdisStore` on the same Redis database with the same key prefix serve
//! the same sessions.

#[cfg(feature = "redis")]
pub(crate) mod conn;
#[cfg(feature = "redis")]
mod pipe;
pub(crate) mod protocol;
#[cfg(feature = "redis")]
pub(crate) mod resp;
pub(crate) mod value;
#[cfg(feature = "webdis")]
pub(crate) mod webdis;
