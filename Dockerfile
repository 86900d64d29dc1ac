# Tessera server image: build with the committed .sqlx data (no database needed).
# Run as it is, it serves on the embedded default in /var/lib/tessera/data (mount a
# volume there and on the keys); docker-compose.yml runs it on PostgreSQL + Redis.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
ENV SQLX_OFFLINE=true
RUN cargo build --release --bin tessera

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/tessera --create-home tessera \
 && install -d -m 0700 -o tessera /var/lib/tessera/keys
COPY --from=build /src/target/release/tessera /usr/local/bin/tessera
USER tessera
WORKDIR /var/lib/tessera
ENV TESSERA__SERVER__HOST=0.0.0.0 \
    TESSERA__KEYS__DIR=/var/lib/tessera/keys \
    TESSERA__LOG__FORMAT=json
EXPOSE 8080
ENTRYPOINT ["tessera"]
CMD ["serve"]
