//! Connection ids: a stale id (its connection closed, its slot reused) reaches no one.

mod util;

use ringcast::{ConnId, Ctx, Engine, Enqueue, Handler, Message};
use tungstenite::Message as WsMessage;
use util::*;

/// "remember" stores this connection's id; "poke" sends to the remembered id and answers with
/// the send status and whether the slot now belongs to the asker.
#[derive(Default)]
struct Ids {
    remembered: Option<ConnId>,
}

impl Handler for Ids {
    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        match &msg.payload()[..] {
            b"remember" => {
                self.remembered = Some(ctx.id());
                let status = ctx.send_text(ctx.id().to_string());
                queued(ctx, status);
            }
            b"poke" => {
                let target = self.remembered.expect("remember first");
                let status = ctx.send_to(target, &Message::text("for the old connection"));
                let reply = ctx.send_text(format!("{status:?} {}", ctx.id()));
                queued(ctx, reply);
            }
            _ => {}
        }
    }
}

#[test]
fn a_stale_id_does_not_reach_the_connection_that_reuses_its_slot() {
    let engine = Engine::start(config(1), |_| Ids::default()).unwrap();
    let addr = engine.local_addr();
    let mut old = connect(addr, "/");
    old.send(WsMessage::text("remember")).unwrap();
    let old_id = old.read().unwrap().into_text().unwrap().to_string();
    old.close(None).unwrap();
    while old.read().is_ok() {}
    wait_until("old connection gone", || {
        engine.handle().metrics().total().connections_active == 0
    });

    let mut new = connect(addr, "/");
    new.send(WsMessage::text("poke")).unwrap();
    let reply = new.read().unwrap().into_text().unwrap().to_string();
    let (status, new_id) = reply.split_once(' ').unwrap();
    assert_eq!(status, format!("{:?}", Enqueue::Closed));
    // Same shard and slot, another generation.
    let slot = |id: &str| id.rsplit_once('.').unwrap().0.to_owned();
    assert_eq!(slot(&old_id), slot(new_id), "the slot was reused");
    assert_ne!(old_id, new_id);
    engine.stop().unwrap();
}
