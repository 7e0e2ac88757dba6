//! The Docker Engine API client: where the engine listens (`parse_url`), connecting with the
//! API version negotiated down to the engine's, and which bridge device each network is.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use bollard::{API_DEFAULT_VERSION, Docker, query_parameters::ListNetworksOptions};

/// Docker's own socket, the default of `up --docker`.
pub const DEFAULT_URL: &str = "unix:///var/run/docker.sock";

/// How long a request may wait for the engine's answer (the event stream's body excepted).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Docker's option naming a bridge network's device (`docker0` for the default network).
const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error(
        "docker URL {url:?}: only a local unix socket is supported (unix:///var/run/docker.sock or a path)"
    )]
    Scheme { url: String },
    #[error("docker URL {url:?} names no socket path")]
    Empty { url: String },
}

/// The socket path of a Docker URL: `unix://PATH` or a bare path; any other scheme is refused.
pub fn parse_url(url: &str) -> Result<PathBuf, UrlError> {
    let path = match url.split_once("://") {
        Some(("unix", path)) => path,
        Some(_) => return Err(UrlError::Scheme { url: url.into() }),
        None => url,
    };
    if path.is_empty() {
        return Err(UrlError::Empty { url: url.into() });
    }
    Ok(PathBuf::from(path))
}

/// Connects to the engine at `socket` and agrees on the API version (Docker 20.10 speaks 1.41).
pub(super) async fn connect(socket: &str) -> Result<Docker, bollard::errors::Error> {
    let docker = Docker::connect_with_unix(socket, REQUEST_TIMEOUT.as_secs(), API_DEFAULT_VERSION)?;
    docker.negotiate_version().await
}

/// The host device of a Docker network: its `com.docker.network.bridge.name` option, else
/// `br-` and the id's first 12 characters for a bridge network (Docker's rule); None for other
/// drivers (host, null, macvlan, overlay), which put no container on a bridge of ours.
pub fn bridge_device(id: &str, driver: &str, options: &HashMap<String, String>) -> Option<String> {
    if driver != "bridge" {
        return None;
    }
    if let Some(name) = options.get(BRIDGE_NAME_OPTION).filter(|n| !n.is_empty()) {
        return Some(name.clone());
    }
    id.get(..12).map(|short| format!("br-{short}"))
}

/// Network id -> its bridge device (None: not a bridge network), from the engine.
#[derive(Debug, Default)]
pub(super) struct Networks {
    devices: HashMap<String, Option<String>>,
}

impl Networks {
    /// Forgets every network and lists them again (after a reconnect).
    pub(super) async fn reload(&mut self, docker: &Docker) -> Result<(), bollard::errors::Error> {
        self.devices.clear();
        for n in docker.list_networks(None::<ListNetworksOptions>).await? {
            if let Some(id) = n.id {
                let options = n.options.unwrap_or_default();
                let device = bridge_device(&id, n.driver.as_deref().unwrap_or(""), &options);
                self.devices.insert(id, device);
            }
        }
        Ok(())
    }

    /// The device of network `id`, asking the engine for a network created since the last list.
    pub(super) async fn device(
        &mut self,
        docker: &Docker,
        id: &str,
    ) -> Result<Option<String>, bollard::errors::Error> {
        if let Some(d) = self.devices.get(id) {
            return Ok(d.clone());
        }
        let n = docker
            .inspect_network(id, None::<bollard::query_parameters::InspectNetworkOptions>)
            .await?;
        let options = n.options.unwrap_or_default();
        let device = bridge_device(id, n.driver.as_deref().unwrap_or(""), &options);
        self.devices.insert(id.to_owned(), device.clone());
        Ok(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url(DEFAULT_URL),
            Ok(PathBuf::from("/var/run/docker.sock"))
        );
        assert_eq!(parse_url("/run/d.sock"), Ok(PathBuf::from("/run/d.sock")));
        assert_eq!(parse_url("unix://d.sock"), Ok(PathBuf::from("d.sock")));
        for bad in [
            "tcp://127.0.0.1:2375",
            "http://x",
            "ssh://h",
            "npipe:////./pipe/d",
        ] {
            let e = parse_url(bad).unwrap_err();
            assert_eq!(e, UrlError::Scheme { url: bad.into() });
            assert!(e.to_string().contains("only a local unix socket"), "{e}");
        }
        assert_eq!(
            parse_url("unix://"),
            Err(UrlError::Empty {
                url: "unix://".into()
            })
        );
        assert!(parse_url("").is_err());
    }

    #[test]
    fn bridge_devices_follow_dockers_rule() {
        let id = "34b6958bbbb4c286734c62e2ee09d46ea69df1cbcbb05d939389cf449f6e5e60";
        let named = HashMap::from([(BRIDGE_NAME_OPTION.to_owned(), "docker0".to_owned())]);
        assert_eq!(
            bridge_device(id, "bridge", &named).as_deref(),
            Some("docker0")
        );
        assert_eq!(
            bridge_device(id, "bridge", &HashMap::new()).as_deref(),
            Some("br-34b6958bbbb4")
        );
        assert_eq!(bridge_device(id, "host", &HashMap::new()), None);
        assert_eq!(bridge_device(id, "null", &named), None);
    }
}
