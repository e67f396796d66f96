//! The protobuf codec of weir's service: prost's, except that a message that does not decode
//! (malformed or truncated protobuf, invalid UTF-8 in a string field) is the client's mistake,
//! `INVALID_ARGUMENT` with the decoder's reason, not `INTERNAL` (a server bug) as tonic's
//! default codec reports it.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The codec the generated service and client use (`codec_path` in build.rs).
#[derive(Debug, Clone)]
pub struct WeirCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for WeirCodec<T, U> {
    fn default() -> Self {
        WeirCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for WeirCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = WeirDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        WeirDecoder(ProstCodec::<T, U>::raw_decoder(BufferSettings::default()))
    }
}

/// prost's decoder with decode errors reported as the sender's mistake.
#[derive(Debug)]
pub struct WeirDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for WeirDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            invalid_message(format!(
                "malformed message: {} (it is not valid weir.v1 protobuf: check that the client \
                 was generated from proto/weir.proto and sends UTF-8 in string fields)",
                status.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// INVALID_ARGUMENT, kind `malformed-request`, for a request that is not a valid message.
fn invalid_message(message: String) -> Status {
    let mut status = Status::invalid_argument(message);
    status.metadata_mut().insert(
        crate::ERROR_KIND_KEY,
        tonic::metadata::MetadataValue::from_static("malformed-request"),
    );
    status
}
