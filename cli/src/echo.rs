//! The echo handler: every message goes back to its sender, unchanged and uncopied.
//!
//! The Autobahn testee and the benchmark target (`ringcast serve --echo`).

use ringcast::{Ctx, Handler, Message};

/// Sends every message back to the connection it came from. Messages that do not fit the
/// outbound limit follow the configured overflow policy.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Echo;

impl Handler for Echo {
    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        let _ = ctx.send(msg);
    }
}
