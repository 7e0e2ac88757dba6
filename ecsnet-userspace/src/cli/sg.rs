//! `ecsnet sg apply|ls`: the security groups, read from a state file, `aws ec2
//! describe-security-groups` output or a bare list, applied under the apply lock.

use std::path::PathBuf;

use clap::Subcommand;

use crate::{
    cli::{UsageError, instance::flows_cut, print_json, task::current_state},
    instance, state,
    store::paths::InstancePaths,
};

#[derive(Debug, Subcommand)]
pub enum SgCmd {
    /// Replace the security groups; accepts `aws ec2 describe-security-groups` output.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Cut tracked flows the new rules no longer allow (by default they live on, as in AWS).
        #[arg(long)]
        reset_flows: bool,
    },
    /// List security groups and their member tasks.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(paths: &InstancePaths, cmd: SgCmd) -> anyhow::Result<()> {
    match cmd {
        SgCmd::Apply { file, reset_flows } => {
            let (prefix, groups) = state::sgfile::read(&file)?;
            let lock = instance::lock_apply(paths)?;
            let mut s = current_state(paths)?;
            s.security_groups = groups;
            // Name a bad rule by its path in the file given, not in the state it joins.
            if let Err(mut error) = state::validate(&s, state::BridgeNet::default())
                && let Some(rest) = error.path.strip_prefix("$.securityGroups")
            {
                error.path = format!("{prefix}{rest}");
                return Err(UsageError::BadFile {
                    file: file.display().to_string(),
                    error,
                }
                .into());
            }
            let a =
                instance::apply_state(paths, &lock, s, &file.display().to_string(), reset_flows)?;
            println!(
                "applied {} security group(s){}",
                a.state.security_groups.len(),
                flows_cut(&a, reset_flows)
            );
        }
        SgCmd::Ls { json } => {
            let s = current_state(paths)?;
            let members = |id: &str| -> Vec<String> {
                s.tasks
                    .iter()
                    .filter(|t| t.security_groups.iter().any(|g| g == id))
                    .map(|t| t.name.clone())
                    .collect()
            };
            if json {
                let v: Vec<serde_json::Value> = s
                    .security_groups
                    .iter()
                    .map(|g| {
                        let group = canonical_ipv6(g.clone());
                        serde_json::json!({"group": group, "members": members(&g.group_id)})
                    })
                    .collect();
                print_json(&v);
            } else {
                for g in &s.security_groups {
                    let m = members(&g.group_id);
                    println!(
                        "{} ({}): members: {}",
                        g.group_id,
                        g.group_name.as_deref().unwrap_or("-"),
                        if m.is_empty() {
                            "none".to_owned()
                        } else {
                            m.join(", ")
                        }
                    );
                    for (inbound, perms) in
                        [(true, &g.ip_permissions), (false, &g.ip_permissions_egress)]
                    {
                        let dir = if inbound { "in " } else { "out" };
                        if perms.is_empty() {
                            println!("  {dir} (none)");
                        }
                        for p in perms {
                            println!("  {dir} {}", state::rules::describe(p, inbound));
                        }
                    }
                }
                if s.security_groups.is_empty() {
                    println!("no security groups");
                }
            }
        }
    }
    Ok(())
}

/// `g` with its IPv6 CIDRs as RFC 5952 writes them, as AWS prints them (`2001:db8::/32`).
fn canonical_ipv6(mut g: state::SecurityGroup) -> state::SecurityGroup {
    let perms = g.ip_permissions.iter_mut();
    for p in perms.chain(g.ip_permissions_egress.iter_mut()) {
        for r in &mut p.ipv6_ranges {
            r.cidr_ipv6 = state::rules::canonical_cidr6(&r.cidr_ipv6);
        }
    }
    g
}
