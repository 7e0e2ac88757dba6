//! What a container's labels say about its task: the ECS agent's `com.amazonaws.ecs.*` labels
//! (identity, flow-log fields) and `ecsnet.security-groups` (its groups). Pure; a container
//! without these labels is a task named after the container, with the default policy.

use std::collections::BTreeMap;

use crate::state::MAX_STRING_BYTES;

pub const TASK_ARN: &str = "com.amazonaws.ecs.task-arn";
pub const CONTAINER_NAME: &str = "com.amazonaws.ecs.container-name";
pub const TASK_DEFINITION_FAMILY: &str = "com.amazonaws.ecs.task-definition-family";
pub const TASK_DEFINITION_VERSION: &str = "com.amazonaws.ecs.task-definition-version";
pub const CLUSTER: &str = "com.amazonaws.ecs.cluster";
/// `sg-a,sg-b`: set through the task definition's `dockerLabels`.
pub const SECURITY_GROUPS: &str = "ecsnet.security-groups";

/// What the ECS labels give a task.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EcsIdentity {
    /// `<task-id>/<container-name>` for an ECS container (unique: in bridge mode every container
    /// of a task has its own veth and address, and container names are unique in a task), else
    /// the Docker container name.
    pub name: String,
    pub task_arn: Option<String>,
    /// `arn:PARTITION:ecs:REGION:ACCOUNT:task-definition/FAMILY:VERSION`, region and account from
    /// the task ARN.
    pub task_definition_arn: Option<String>,
    pub cluster: Option<String>,
    /// A label ecsnet could not use, one line each.
    pub notes: Vec<String>,
}

/// The parts of a task ARN: `arn:PARTITION:ecs:REGION:ACCOUNT:task/[CLUSTER/]TASK-ID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskArn<'a> {
    pub partition: &'a str,
    pub region: &'a str,
    pub account: &'a str,
    pub task_id: &'a str,
}

impl<'a> TaskArn<'a> {
    pub fn parse(arn: &'a str) -> Option<Self> {
        let mut parts = arn.splitn(6, ':');
        let (Some("arn"), Some(partition), Some("ecs"), Some(region), Some(account), Some(rest)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let task_id = rest.strip_prefix("task/")?.rsplit('/').next()?;
        let fields = [partition, region, account, task_id];
        if fields.iter().any(|f| f.is_empty()) {
            return None;
        }
        Some(Self {
            partition,
            region,
            account,
            task_id,
        })
    }
}

/// The identity of a container from its labels; `container` is its Docker name (no '/').
pub fn ecs_identity(labels: &BTreeMap<String, String>, container: &str) -> EcsIdentity {
    let label = |key| {
        labels
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    let mut id = EcsIdentity {
        name: container.to_owned(),
        cluster: label(CLUSTER).map(str::to_owned),
        ..EcsIdentity::default()
    };
    let Some(raw) = label(TASK_ARN) else {
        return id;
    };
    id.task_arn = Some(raw.to_owned());
    let Some(arn) = TaskArn::parse(raw) else {
        id.notes.push(format!(
            "label {TASK_ARN}={raw:?} is not an ECS task ARN: task named after its container"
        ));
        return id;
    };
    let member = label(CONTAINER_NAME).unwrap_or(container);
    id.name = format!("{}/{member}", arn.task_id);
    match (
        label(TASK_DEFINITION_FAMILY),
        label(TASK_DEFINITION_VERSION),
    ) {
        (Some(family), Some(version)) => {
            id.task_definition_arn = Some(format!(
                "arn:{}:ecs:{}:{}:task-definition/{family}:{version}",
                arn.partition, arn.region, arn.account
            ));
        }
        _ => id.notes.push(format!(
            "no {TASK_DEFINITION_FAMILY} and {TASK_DEFINITION_VERSION}: no task definition ARN"
        )),
    }
    id
}

/// Why `ecsnet.security-groups` cannot be used: the task fails closed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, thiserror::Error)]
pub enum LabelError {
    #[error("label {SECURITY_GROUPS}={value:?}: item {index} is empty")]
    EmptyGroup { value: String, index: usize },
    #[error(
        "label {SECURITY_GROUPS}: group {group:?} has a character other than letters, digits, '-', '_' and '.'"
    )]
    BadCharacter { group: String },
    #[error("label {SECURITY_GROUPS}: group id of {len} bytes, longer than {MAX_STRING_BYTES}")]
    TooLong { len: usize },
}

/// The groups `ecsnet.security-groups` names, in its order without repeats; None without the
/// label. Items are trimmed; an empty item or a bad character rejects the whole label.
pub fn security_groups(
    labels: &BTreeMap<String, String>,
) -> Option<Result<Vec<String>, LabelError>> {
    let value = labels.get(SECURITY_GROUPS)?;
    Some(parse_groups(value))
}

fn parse_groups(value: &str) -> Result<Vec<String>, LabelError> {
    let mut groups: Vec<String> = Vec::new();
    for (index, item) in value.split(',').map(str::trim).enumerate() {
        if item.is_empty() {
            return Err(LabelError::EmptyGroup {
                value: value.to_owned(),
                index,
            });
        }
        if item.len() > MAX_STRING_BYTES {
            return Err(LabelError::TooLong { len: item.len() });
        }
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if !item.chars().all(ok) {
            return Err(LabelError::BadCharacter {
                group: item.to_owned(),
            });
        }
        if !groups.iter().any(|g| g == item) {
            groups.push(item.to_owned());
        }
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str =
        "arn:aws:ecs:us-east-1:123456789012:task/demo/0a1b2c3d4e5f67890123456789abcdef";

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn ecs(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut l = labels(&[
            (TASK_ARN, ARN),
            (CONTAINER_NAME, "web"),
            (TASK_DEFINITION_FAMILY, "web"),
            (TASK_DEFINITION_VERSION, "3"),
            (CLUSTER, "demo"),
        ]);
        l.extend(labels(extra));
        l
    }

    #[test]
    fn ecs_labels_name_the_task_and_its_definition() {
        let id = ecs_identity(&ecs(&[]), "ecs-web-3-web-8a9b");
        assert_eq!(id.name, "0a1b2c3d4e5f67890123456789abcdef/web");
        assert_eq!(id.task_arn.as_deref(), Some(ARN));
        assert_eq!(
            id.task_definition_arn.as_deref(),
            Some("arn:aws:ecs:us-east-1:123456789012:task-definition/web:3")
        );
        assert_eq!(id.cluster.as_deref(), Some("demo"));
        assert!(id.notes.is_empty(), "{:?}", id.notes);
    }

    #[test]
    fn containers_of_one_task_get_distinct_names() {
        let a = ecs_identity(&ecs(&[]), "ecs-web-3-web-8a9b");
        let b = ecs_identity(
            &ecs(&[(CONTAINER_NAME, "sidecar")]),
            "ecs-web-3-sidecar-1c2d",
        );
        assert_ne!(a.name, b.name);
        assert_eq!(a.task_arn, b.task_arn);
        assert_eq!(b.name, "0a1b2c3d4e5f67890123456789abcdef/sidecar");
    }

    #[test]
    fn old_arn_format_other_partitions_and_missing_labels() {
        let old = "arn:aws-cn:ecs:cn-north-1:111122223333:task/1234abcd";
        let id = ecs_identity(
            &labels(&[(TASK_ARN, old), (TASK_DEFINITION_FAMILY, "f")]),
            "c1",
        );
        assert_eq!(
            id.name, "1234abcd/c1",
            "no container-name label: Docker's name"
        );
        assert_eq!(id.task_definition_arn, None);
        assert_eq!(id.notes.len(), 1, "{:?}", id.notes);
        let id = ecs_identity(
            &labels(&[
                (TASK_ARN, old),
                (TASK_DEFINITION_FAMILY, "f"),
                (TASK_DEFINITION_VERSION, "12"),
            ]),
            "c1",
        );
        assert_eq!(
            id.task_definition_arn.as_deref(),
            Some("arn:aws-cn:ecs:cn-north-1:111122223333:task-definition/f:12")
        );
    }

    #[test]
    fn no_or_bad_ecs_labels_name_the_task_after_the_container() {
        let id = ecs_identity(&labels(&[("maintainer", "x")]), "plain");
        assert_eq!(
            id,
            EcsIdentity {
                name: "plain".into(),
                ..EcsIdentity::default()
            }
        );
        for bad in [
            "not-an-arn",
            "arn:aws:ecs:us-east-1:123456789012:service/demo/web",
            "arn:aws:s3:us-east-1:123456789012:task/x",
            "arn:aws:ecs::123456789012:task/x",
            "arn:aws:ecs:us-east-1:123456789012:task/",
        ] {
            let id = ecs_identity(&labels(&[(TASK_ARN, bad)]), "c");
            assert_eq!(id.name, "c", "{bad}");
            assert_eq!(id.task_arn.as_deref(), Some(bad), "kept for the flow log");
            assert_eq!(id.task_definition_arn, None, "{bad}");
            assert!(id.notes[0].contains("not an ECS task ARN"), "{bad}");
        }
    }

    #[test]
    fn group_label_is_trimmed_deduplicated_and_strict() {
        assert_eq!(security_groups(&labels(&[])), None);
        let ok = security_groups(&labels(&[(SECURITY_GROUPS, " sg-a, sg-b ,sg-a,sg_c.1")]));
        assert_eq!(
            ok,
            Some(Ok(vec!["sg-a".into(), "sg-b".into(), "sg_c.1".into()]))
        );
        for (value, index) in [("", 0), ("sg-a,", 1), ("sg-a,,sg-b", 1), (" , sg-a", 0)] {
            assert_eq!(
                security_groups(&labels(&[(SECURITY_GROUPS, value)])),
                Some(Err(LabelError::EmptyGroup {
                    value: value.into(),
                    index
                })),
                "{value:?}"
            );
        }
        for bad in ["sg a", "sg-a;rm", "sg-é", "sg-a\n"] {
            let got = security_groups(&labels(&[(SECURITY_GROUPS, &format!("sg-x,{bad}x"))]));
            assert!(
                matches!(got, Some(Err(LabelError::BadCharacter { .. }))),
                "{bad:?}: {got:?}"
            );
        }
        let long = "s".repeat(MAX_STRING_BYTES + 1);
        assert_eq!(
            security_groups(&labels(&[(SECURITY_GROUPS, &long)])),
            Some(Err(LabelError::TooLong { len: long.len() }))
        );
    }
}
