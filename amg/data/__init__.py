"""Re-ID data: on-disk layouts (`layout`), image loading and transforms, identity-balanced
sampling, and the synthetic set (torch-free): `synthetic` chooses and writes its images,
`synthetic_render` draws one (identities, cameras, people), `synthetic_occluders` the
occluders and `synthetic_canvas` the shared drawing primitives."""
