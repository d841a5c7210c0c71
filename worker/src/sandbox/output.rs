use tokio::io::{AsyncRead, AsyncReadExt};

/// Output kept up to a cap. Past the cap the stream is still drained (so the
/// writer never blocks on a full pipe) but the bytes are dropped and counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CappedOutput {
    pub bytes: Vec<u8>,
    /// Everything the command wrote, kept or not.
    pub total: u64,
}

impl CappedOutput {
    pub fn truncated(&self) -> bool {
        self.total > self.bytes.len() as u64
    }

    /// The kept bytes as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Reads `reader` to its end, keeping at most `cap` bytes.
    pub async fn read_from<R: AsyncRead + Unpin>(
        mut reader: R,
        cap: usize,
    ) -> std::io::Result<Self> {
        let mut output = Self::default();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = reader.read(&mut buffer).await?;
            if n == 0 {
                return Ok(output);
            }
            output.total += n as u64;
            let room = cap.saturating_sub(output.bytes.len());
            output.bytes.extend_from_slice(&buffer[..n.min(room)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_head_and_counts_everything() {
        let data = vec![b'x'; 200_000];
        let output = CappedOutput::read_from(&data[..], 1000).await.unwrap();
        assert_eq!(output.bytes.len(), 1000);
        assert_eq!(output.total, 200_000);
        assert!(output.truncated());

        let short = CappedOutput::read_from(&b"hi\n"[..], 1000).await.unwrap();
        assert_eq!(short.text(), "hi\n");
        assert!(!short.truncated());
    }
}
