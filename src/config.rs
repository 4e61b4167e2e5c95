//! Cookie attributes, expiry policy and limits.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Kind};
use crate::sign::Keys;

pub use cookie::SameSite;

/// When a session ends.
///
/// Every policy slides: each request that uses the session (reads too) pushes the end out again,
/// so active users stay signed in. The store's copy of the expiry is refreshed only once a tenth
/// of the idle window has passed since its last refresh, so a read does not cost a write each
/// time; a session can therefore end up to a tenth of the window early. An absolute lifetime
/// ([`SessionLayerBuilder::absolute_lifetime`](crate::SessionLayerBuilder::absolute_lifetime))
/// caps every policy.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use hyper_sessions::Expiry;
///
/// let day = Expiry::OnInactivity(Duration::from_secs(24 * 3600));
/// assert_eq!(day.idle_timeout(), Duration::from_secs(86_400));
/// let tab = Expiry::OnSessionEnd(Duration::from_secs(3600));
/// assert!(!tab.persistent_cookie());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Expiry {
    /// The session ends after this long without a request that uses it. The cookie is
    /// persistent, with a `Max-Age` that follows the server-side expiry.
    #[serde(rename = "i")]
    OnInactivity(#[serde(with = "millis")] Duration),
    /// A browser-session cookie (no `Max-Age`: the browser drops it when it closes) whose
    /// server-side record still ends after this long without use.
    #[serde(rename = "s")]
    OnSessionEnd(#[serde(with = "millis")] Duration),
}

impl Expiry {
    /// The idle timeout after which the server-side record ends.
    pub fn idle_timeout(self) -> Duration {
        match self {
            Expiry::OnInactivity(d) | Expiry::OnSessionEnd(d) => d,
        }
    }

    /// Whether the cookie carries a `Max-Age`.
    pub fn persistent_cookie(self) -> bool {
        matches!(self, Expiry::OnInactivity(_))
    }
}

impl Default for Expiry {
    /// A day of inactivity.
    fn default() -> Self {
        Expiry::OnInactivity(Duration::from_secs(24 * 3600))
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Turns a session error after the handler ran (a failed save, a lost session) into the
/// response status and headers; the body is the response body type's `Default` (empty).
pub type ErrorHandler = Arc<dyn Fn(&Error) -> Response<()> + Send + Sync>;

/// The default error handler: 503 when the store is unavailable, 500 otherwise, no body.
pub(crate) fn default_error_handler(err: &Error) -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = if err.is_unavailable() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    resp
}

/// The validated configuration shared by every request.
pub(crate) struct Config {
    pub(crate) cookie_name: String,
    /// `"{name}="`.
    pub(crate) cookie_prefix: String,
    /// Every attribute but the lifetime, starting with `"; "`.
    pub(crate) cookie_attributes: String,
    pub(crate) expiry: Expiry,
    pub(crate) absolute_lifetime: Option<Duration>,
    pub(crate) max_record_bytes: usize,
    pub(crate) max_save_attempts: u32,
    pub(crate) error_handler: ErrorHandler,
    /// The signing keys, first one current; `None`: unsigned cookies.
    pub(crate) signing_keys: Option<Keys>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("cookie_name", &self.cookie_name)
            .field("cookie_attributes", &self.cookie_attributes)
            .field("expiry", &self.expiry)
            .field("absolute_lifetime", &self.absolute_lifetime)
            .field("max_record_bytes", &self.max_record_bytes)
            .field("max_save_attempts", &self.max_save_attempts)
            .field("signing_keys", &self.signing_keys)
            .finish_non_exhaustive()
    }
}

/// Cookie attributes as configured, before validation.
#[derive(Debug, Clone)]
pub(crate) struct CookieSettings {
    pub(crate) name: String,
    pub(crate) domain: Option<String>,
    pub(crate) path: String,
    pub(crate) same_site: SameSite,
    pub(crate) secure: bool,
    pub(crate) http_only: bool,
    pub(crate) partitioned: bool,
}

impl Default for CookieSettings {
    fn default() -> Self {
        CookieSettings {
            name: "id".to_owned(),
            domain: None,
            path: "/".to_owned(),
            same_site: SameSite::Lax,
            secure: true,
            http_only: true,
            partitioned: false,
        }
    }
}

fn config_error(msg: String) -> Error {
    Error::with(Kind::Config, msg)
}

fn is_token_char(b: u8) -> bool {
    // RFC 9110 tchar.
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_attribute_value(s: &str) -> bool {
    // RFC 6265 av-octet: any CHAR except CTLs or ";".
    s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b';')
}

impl CookieSettings {
    /// Checks the attributes and renders the fixed parts of `Set-Cookie`.
    pub(crate) fn render(&self) -> Result<(String, String), Error> {
        let name = &self.name;
        if name.is_empty() || !name.bytes().all(is_token_char) {
            return Err(config_error(format!(
                "cookie name {name:?} is not an RFC 6265 token"
            )));
        }
        if !self.path.starts_with('/') || !is_attribute_value(&self.path) {
            return Err(config_error(format!(
                "cookie path {:?} must start with '/' and hold no ';' or control characters",
                self.path
            )));
        }
        if let Some(domain) = &self.domain
            && (domain.is_empty() || !is_attribute_value(domain) || domain.contains(' '))
        {
            return Err(config_error(format!(
                "cookie domain {domain:?} is not a valid domain attribute"
            )));
        }
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("__host-") {
            if !self.secure || self.path != "/" || self.domain.is_some() {
                return Err(config_error(format!(
                    "cookie {name:?} has the __Host- prefix, which browsers accept only with \
                     Secure, Path=/ and no Domain"
                )));
            }
        } else if lower.starts_with("__secure-") && !self.secure {
            return Err(config_error(format!(
                "cookie {name:?} has the __Secure- prefix, which browsers accept only with Secure"
            )));
        }
        if self.same_site == SameSite::None && !self.secure {
            return Err(config_error(
                "SameSite=None cookies are rejected by browsers unless Secure".to_owned(),
            ));
        }
        if self.partitioned && !self.secure {
            return Err(config_error(
                "Partitioned cookies are rejected by browsers unless Secure".to_owned(),
            ));
        }

        let mut cookie = cookie::Cookie::new(name.clone(), "");
        cookie.set_path(self.path.clone());
        if let Some(domain) = &self.domain {
            cookie.set_domain(domain.clone());
        }
        cookie.set_same_site(self.same_site);
        cookie.set_secure(self.secure);
        cookie.set_http_only(self.http_only);
        cookie.set_partitioned(self.partitioned);
        let rendered = cookie.to_string();
        let prefix = format!("{name}=");
        let attributes = rendered
            .strip_prefix(&prefix)
            .ok_or_else(|| config_error(format!("cookie {name:?} did not render as expected")))?
            .to_owned();
        Ok((prefix, attributes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_attributes() {
        let (prefix, attrs) = CookieSettings::default().render().unwrap();
        assert_eq!(prefix, "id=");
        for a in ["HttpOnly", "SameSite=Lax", "Secure", "Path=/"] {
            assert!(attrs.contains(a), "{attrs}");
        }
        assert!(attrs.starts_with("; "));
    }

    #[test]
    fn prefixed_names_are_validated() {
        let host = CookieSettings {
            name: "__Host-id".into(),
            ..CookieSettings::default()
        };
        assert!(host.render().is_ok());
        let bad_path = CookieSettings {
            path: "/app".into(),
            ..host.clone()
        };
        assert!(bad_path.render().unwrap_err().is_config());
        let bad_domain = CookieSettings {
            domain: Some("example.com".into()),
            ..host.clone()
        };
        assert!(bad_domain.render().is_err());
        let insecure = CookieSettings {
            secure: false,
            ..host
        };
        assert!(insecure.render().is_err());
        let secure_prefix = CookieSettings {
            name: "__Secure-id".into(),
            secure: false,
            ..CookieSettings::default()
        };
        assert!(secure_prefix.render().is_err());
    }

    #[test]
    fn hostile_values_are_refused() {
        for name in ["", "a b", "a;b", "a=b", "é"] {
            let s = CookieSettings {
                name: name.into(),
                ..CookieSettings::default()
            };
            assert!(s.render().is_err(), "{name:?}");
        }
        let s = CookieSettings {
            path: "/; Domain=evil".into(),
            ..CookieSettings::default()
        };
        assert!(s.render().is_err());
        let s = CookieSettings {
            domain: Some("a.com; Secure".into()),
            ..CookieSettings::default()
        };
        assert!(s.render().is_err());
        let s = CookieSettings {
            same_site: SameSite::None,
            secure: false,
            ..CookieSettings::default()
        };
        assert!(s.render().is_err());
    }
}
