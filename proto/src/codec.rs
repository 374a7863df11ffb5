//! The protobuf codec of every Ferry service and client: prost's, but a
//! message that does not decode (a `string` field that is not UTF-8, a
//! truncated field) is the sender's fault and answers `InvalidArgument`,
//! not `Internal`, which would say the server failed.

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// prost's codec with decode failures as `InvalidArgument`.
#[derive(Debug, Clone)]
pub struct FerryCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for FerryCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for FerryCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = FerryDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        FerryDecoder(self.0.decoder())
    }
}

/// prost's decoder with decode failures as `InvalidArgument`.
#[derive(Debug, Clone)]
pub struct FerryDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for FerryDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0
            .decode(buf)
            .map_err(|e| Status::invalid_argument(format!("not a valid protobuf message: {}", e.message())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
