//! Token auth's stand-in when the `jwt` feature is off: an [`Auth`] that cannot exist.
//!
//! `EngineConfig::validate` refuses `auth.required = true` in such a build (naming the
//! feature), and `Broker::with_auth` is not there to take one, so a broker never holds an
//! `Auth`. These types have no values: the broker's auth paths compile to nothing and its
//! code stays the same in both builds. None of them is public.

use std::time::SystemTime;

use ringcast_protocol::UpgradeRequest;

/// No token auth in this build.
#[derive(Debug)]
pub(crate) enum Auth {}

/// No grants without token auth.
#[derive(Debug)]
pub(crate) enum Grants {}

/// No refusals by token without token auth.
#[derive(Debug)]
pub(crate) struct AuthError;

impl Auth {
    pub(crate) fn authenticate(&self, _req: &UpgradeRequest<'_>) -> Result<Grants, AuthError> {
        match *self {}
    }
}

impl AuthError {
    pub(crate) fn challenge(&self) -> String {
        "Bearer realm=\"ringcast\"".into()
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("token auth is not built in")
    }
}

impl Grants {
    pub(crate) fn user(&self) -> &str {
        match *self {}
    }

    pub(crate) fn expired_at(&self, _now: SystemTime) -> bool {
        match *self {}
    }

    pub(crate) fn may_subscribe(&self, _topic: &str) -> bool {
        match *self {}
    }

    pub(crate) fn may_publish(&self, _topic: &str) -> bool {
        match *self {}
    }
}
