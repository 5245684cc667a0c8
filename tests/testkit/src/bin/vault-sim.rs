//! The Vault simulator as a program, for the simulator's container image: serves
//! `sys/health` and `sys/leader` on `--port` in the given role, and takes a new role on a
//! second port (`PUT /role/<role>` on `--control-port`), so a test can fail the active node
//! over from outside the pod.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vault_registrar_testkit::vault_sim::{Role, SimState, VaultSim};

const USAGE: &str = "usage: vault-sim [--role active|standby|perf-standby|sealed|uninitialized] [--port 8200] [--control-port 8201]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (mut role, mut port, mut control) = (Role::Standby, 8200u16, 8201u16);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--role" => role = parse_role(&value)?,
            "--port" => {
                port = value
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--port {value}: {e}"))?
            }
            "--control-port" => {
                control = value
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--control-port {value}: {e}"))?
            }
            _ => anyhow::bail!("unknown flag {flag}; {USAGE}"),
        }
    }
    let sim = VaultSim::start(
        SocketAddr::from(([0, 0, 0, 0], port)),
        None,
        SimState::new(role),
    )
    .await?;
    println!("vault-sim serving {role:?} on :{port}, control on :{control}");
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", control)).await?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1024];
        let n = conn.read(&mut buf).await.unwrap_or(0);
        let request = String::from_utf8_lossy(&buf[..n]);
        let line = request.lines().next().unwrap_or_default();
        let answer = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["PUT", path, ..] if path.starts_with("/role/") => {
                match parse_role(&path["/role/".len()..]) {
                    Ok(next) => {
                        sim.update(|s| s.role = next).await;
                        println!("role now {next:?}");
                        "204 No Content"
                    }
                    Err(_) => "400 Bad Request",
                }
            }
            _ => "404 Not Found",
        };
        let _ = conn
            .write_all(
                format!("HTTP/1.1 {answer}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await;
    }
}

fn parse_role(text: &str) -> anyhow::Result<Role> {
    Ok(match text {
        "active" => Role::Active,
        "standby" => Role::Standby,
        "perf-standby" => Role::PerfStandby,
        "sealed" => Role::Sealed,
        "uninitialized" => Role::Uninitialized,
        _ => anyhow::bail!(
            "role {text:?} is not one of active, standby, perf-standby, sealed, uninitialized"
        ),
    })
}
