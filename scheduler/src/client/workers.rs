//! `GET /v1/workers` and `GET /v1/fleet`: the fleet view (`shoal workers`,
//! `shoal top`).

use super::{Client, ClientError};
use crate::fleet::{FleetSummary, WorkerList};

impl Client {
    /// The live workers.
    pub async fn workers(&self) -> Result<WorkerList, ClientError> {
        self.send(self.http.get(self.url("/v1/workers"))).await
    }

    /// The fleet summary `shoal top` shows.
    pub async fn fleet(&self) -> Result<FleetSummary, ClientError> {
        self.send(self.http.get(self.url("/v1/fleet"))).await
    }
}
