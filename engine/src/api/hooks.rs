//! Calling the handler's hooks with their panics caught, so that one connection's bad input
//! cannot take down the shard and every other connection on it.
//!
//! Owns the catch around a hook ([`call`]), the record of what panicked ([`Caught`]), the
//! marker for engine code running inside a hook ([`engine_code`]) and the process panic hook
//! that keeps a caught panic from being printed twice. It does not decide what happens to the
//! connection: `shard/process.rs` does (1011, 500, a count and one log line).
//!
//! Why continuing is sound: a hook only reaches shard state through `Ctx`, whose methods never
//! call back into handler code. So a panic raised by handler code leaves the connection table
//! between two `Ctx` calls, consistent, and the shard may go on (`AssertUnwindSafe` in
//! [`call`] relies on exactly this). A panic raised inside a `Ctx` method is an engine bug
//! that may have left the table half-updated: [`call`] does not catch it (the marker tells
//! them apart), and the shard goes down as it would have without the catch. The handler's
//! own state is the handler's to keep consistent; `Handler` documents that it is used again.

use std::{
    backtrace::{Backtrace, BacktraceStatus},
    cell::{Cell, RefCell},
    panic::{self, AssertUnwindSafe, PanicHookInfo},
    sync::Once,
};

/// A panic raised by handler code during a hook, caught.
#[derive(Debug)]
pub(crate) struct Caught {
    /// The panic message (`"Box<dyn Any>"` for a payload that is not a string).
    pub(crate) message: String,
    /// Where it was raised, `file:line:column`, when the panic hook saw it.
    pub(crate) location: Option<String>,
    /// The backtrace, when `RUST_BACKTRACE` (or `RUST_LIB_BACKTRACE`) asks for one.
    pub(crate) backtrace: Option<String>,
}

/// What the panic hook learned of a panic on this thread.
struct Seen {
    caught: Caught,
    /// Raised inside engine code (a `Ctx` method): not the handler's, not caught.
    in_engine: bool,
}

thread_local! {
    /// True while a hook runs on this thread (inside [`call`]).
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
    /// How deep this thread is in engine code called from a hook (`Ctx` methods).
    static ENGINE_DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The panic hook's record of the last panic raised while a hook ran.
    static SEEN: RefCell<Option<Seen>> = const { RefCell::new(None) };
}

/// Marks engine code running inside a hook until dropped (see [`engine_code`]).
#[derive(Debug)]
pub(crate) struct EngineCode(());

impl Drop for EngineCode {
    fn drop(&mut self) {
        ENGINE_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// Marks the rest of the caller's scope as engine code: a panic raised there is an engine
/// bug, which [`call`] lets through instead of catching. Every `Ctx` method that changes
/// shard state starts with it.
pub(crate) fn engine_code() -> EngineCode {
    ENGINE_DEPTH.with(|d| d.set(d.get() + 1));
    EngineCode(())
}

/// Runs one hook, catching a panic raised by handler code in it.
///
/// # Errors
/// [`Caught`] with the panic's message and location when handler code panicked. A panic
/// raised in engine code (under [`engine_code`]) is resumed, not returned.
pub(crate) fn call<R>(hook: impl FnOnce() -> R) -> Result<R, Caught> {
    install_panic_hook();
    let outer = IN_HOOK.with(|h| h.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(hook));
    IN_HOOK.with(|h| h.set(outer));
    let seen = SEEN.with(|s| s.borrow_mut().take());
    match result {
        Ok(value) => {
            if let Some(seen) = seen {
                // The handler caught a panic of its own: the panic hook kept it from stderr,
                // so say it here rather than lose it.
                tracing::warn!(
                    panic = %seen.caught.message,
                    location = seen.caught.location.as_deref().unwrap_or("unknown"),
                    "a handler hook caught a panic of its own"
                );
            }
            Ok(value)
        }
        Err(payload) => match seen {
            Some(seen) if seen.in_engine => panic::resume_unwind(payload),
            Some(seen) => Err(seen.caught),
            // Another panic hook replaced ours: the payload is all there is.
            None => Err(Caught {
                message: payload_message(&*payload),
                location: None,
                backtrace: None,
            }),
        },
    }
}

/// The text of a panic payload: the message of `panic!("...")`, as the default hook prints it.
fn payload_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        String::from("Box<dyn Any>")
    }
}

/// Installs, once per process, a panic hook in front of the one in place: a panic raised while
/// a hook runs on this thread is recorded for [`call`] to log once (with the connection it
/// hit) instead of being printed as well, unless it comes from engine code; every other panic
/// goes to the previous hook unchanged. An embedder that sets its own hook after starting the
/// engine replaces this one: caught panics are then printed by it and logged too.
fn install_panic_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info: &PanicHookInfo<'_>| {
            if !IN_HOOK.with(Cell::get) {
                return previous(info);
            }
            let in_engine = ENGINE_DEPTH.with(Cell::get) > 0;
            if in_engine {
                previous(info);
            }
            let backtrace = (!in_engine)
                .then(Backtrace::capture)
                .filter(|b| b.status() == BacktraceStatus::Captured)
                .map(|b| b.to_string());
            let caught = Caught {
                message: payload_message(info.payload()),
                location: info.location().map(ToString::to_string),
                backtrace,
            };
            // `try_borrow_mut`: a panic while the record is borrowed (it never is across a
            // panic) must not panic in the hook.
            SEEN.with(|s| {
                if let Ok(mut s) = s.try_borrow_mut() {
                    *s = Some(Seen { caught, in_engine });
                }
            });
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_panic_is_caught_with_its_message_and_location() {
        let caught = call(|| panic!("bad input {}", 7)).expect_err("caught");
        assert_eq!(caught.message, "bad input 7");
        assert!(caught
            .location
            .as_deref()
            .is_some_and(|l| l.contains("hooks.rs")));
        assert_eq!(call(|| 5).expect("no panic"), 5);
    }

    #[test]
    fn an_engine_panic_inside_a_hook_is_not_caught() {
        let outer = panic::catch_unwind(|| {
            let _ = call(|| {
                let _engine = engine_code();
                panic!("engine bug");
            });
        });
        assert!(outer.is_err(), "the engine's panic went through");
        assert_eq!(ENGINE_DEPTH.with(Cell::get), 0, "the marker unwound");
        assert!(!IN_HOOK.with(Cell::get));
        // The thread still catches handler panics afterwards.
        assert!(call(|| panic!("later")).is_err());
    }

    #[test]
    fn a_panic_the_handler_catches_itself_is_not_reported() {
        let value = call(|| panic::catch_unwind(|| panic!("inner")).is_err());
        assert_eq!(value.ok(), Some(true));
        assert!(SEEN.with(|s| s.borrow().is_none()));
    }
}
