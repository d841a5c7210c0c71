//! `shoal token hash`: the configuration line of a bearer token — its
//! SHA-256 digest, `sha256:<64 hex>` (ADR 0036). The token is read from
//! stdin (one line) or made up with `--generate`; the digest goes into
//! `scheduler.tokens` or the tokens file (a Kubernetes Secret), and only the
//! caller keeps the token.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{bail, Context};
use serde::Serialize;
use shoal_scheduler::api::{token_digest, token_digest_line};

use super::{print_json, Output};

#[derive(clap::Subcommand)]
pub enum TokenCommand {
    /// Print the `sha256:<hex>` form of a token for the scheduler's
    /// configuration. Reads the token from stdin (one line), or makes up a
    /// random one with `--generate` and prints it once.
    Hash(HashArgs),
}

#[derive(clap::Args)]
pub struct HashArgs {
    /// Make up a random token (32 bytes from the OS, hex) instead of reading one.
    #[arg(long)]
    generate: bool,
    /// Print the tokens-file line `<digest> <tenant>` (`*` for an admin token).
    #[arg(long, value_name = "TENANT")]
    tenant: Option<String>,
}

#[derive(Debug, Serialize)]
struct Hashed {
    /// The digest, as configured: `sha256:<64 hex>`.
    digest: String,
    /// The tokens-file line, when `--tenant` was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<String>,
    /// The token, when made up by `--generate` (shown once, never stored).
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

pub fn token(output: Output, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Hash(args) => hash(output, args),
    }
}

fn hash(output: Output, args: HashArgs) -> anyhow::Result<()> {
    if let Some(tenant) = &args.tenant {
        if tenant != "*" && !shoal_shared::Name::is_valid(tenant) {
            bail!("--tenant {tenant:?} is not a tenant name (letters, digits, `_.-`), nor `*` for an admin token");
        }
    }
    let (token, generated) = if args.generate {
        (generate()?, true)
    } else {
        (read_stdin()?, false)
    };
    let digest = token_digest_line(&token_digest(&token));
    let hashed = Hashed {
        line: args.tenant.as_ref().map(|t| format!("{digest} {t}")),
        digest,
        token: generated.then_some(token),
    };
    match output {
        Output::Json => print_json(&hashed),
        Output::Text => {
            let mut out = std::io::stdout().lock();
            if let Some(token) = &hashed.token {
                writeln!(out, "token:  {token}")?;
            }
            match &hashed.line {
                Some(line) => writeln!(out, "line:   {line}")?,
                None => writeln!(out, "digest: {}", hashed.digest)?,
            }
            if hashed.token.is_some() {
                writeln!(
                    out,
                    "Give the token to its user; configure only the digest (it is shown once)."
                )?;
            }
            Ok(())
        }
    }
}

/// 32 random bytes from the OS, hex, with a `shoal_` prefix so a leaked one
/// is recognisable.
fn generate() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no random bytes from the OS: {e}"))?;
    Ok(format!(
        "shoal_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// One line of stdin, without its line ending; it must be a valid token.
fn read_stdin() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("token (then Enter):");
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("reading the token from stdin")?;
    let token = line.trim_end_matches(['\n', '\r']);
    if token.is_empty() {
        bail!("no token on stdin: pipe one in (`printf %s \"$TOKEN\" | shoal token hash`) or use --generate");
    }
    if token.len() > 4096 || !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        bail!("a token must be 1-4096 visible ASCII characters (no spaces)");
    }
    if token.starts_with("sha256:") {
        bail!("that is already a digest: configure it as it is");
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_differ_and_are_visible_ascii() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 6 + 64);
        assert!(a.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    }
}
