//! `capsule port ID [PORT]`: expose a guest port on the host's loopback
//! and print the address that reaches it (or, without PORT, list the
//! sandbox's exposed ports; with --rm, stop exposing one), through the
//! API's `/ports` endpoints.

use anyhow::{bail, Result};
use clap::Args;
use hyper::Method;
use serde_json::json;

use crate::api::ports::PortView;
use crate::client::{encode, ApiClient};

#[derive(Args, Debug)]
pub struct PortArgs {
    /// The daemon sandbox's id.
    pub id: String,
    /// The guest's TCP port (none: list the exposed ones).
    pub port: Option<u16>,
    /// Stop exposing PORT.
    #[arg(long, requires = "port")]
    pub rm: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn port(args: PortArgs) -> Result<u8> {
    let client = ApiClient::new()?;
    let base = format!("/v1/sandboxes/{}/ports", encode(&args.id));
    match (args.port, args.rm) {
        (Some(0), _) => bail!("port 0 is not a port"),
        (Some(port), true) => {
            client.delete(&format!("{base}/{port}"))?;
        }
        (Some(port), false) => {
            let view: PortView = client.call(Method::POST, &base, Some(json!({ "port": port })))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                println!("{}", view.address);
            }
        }
        (None, _) => {
            let listed: Vec<PortView> = client.call(Method::GET, &base, None)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&listed)?);
            } else {
                for p in listed {
                    println!("{}\t{}", p.port, p.address);
                }
            }
        }
    }
    Ok(0)
}
