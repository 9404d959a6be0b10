//! Prints every event of one topic, resuming across server restarts:
//!
//! ```sh
//! cargo run --release -p ringcast-cli -- serve            # in one terminal
//! cargo run -p ringcast-client --example print_topic -- ws://127.0.0.1:9000/ prices.BTC
//! ```
//!
//! Publish to it with `ringcast pub ws://127.0.0.1:9000/ prices.BTC '{"bid":1}'`, then
//! restart the server: the example goes on after a `resubscribed` line.

use ringcast_client::{Client, Config, Event};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "ws://127.0.0.1:9000/".into());
    let topic = args.next().unwrap_or_else(|| "prices.BTC".into());
    let client = Client::connect(Config::new(url))?;
    let mut events = client.subscribe(&topic).await?;
    while let Some(event) = events.next().await {
        match event {
            Event::Message { seq, data } => println!("{topic} #{seq} {}", data.text()),
            Event::Dropped { count, next } => println!("{topic}: {count} dropped, next #{next}"),
            Event::Reset { oldest, .. } => println!("{topic}: reset, next #{oldest}"),
            Event::Resubscribed { since } => println!("{topic}: resubscribed after {since:?}"),
            Event::Stopped(error) => return Err(error.into()),
            other => println!("{topic}: {other:?}"),
        }
    }
    Ok(())
}
