"""Pure protocol layer of accelerator: no sockets, no files, no threads.

Modules: `errors` (the exception hierarchy), `resources` (levels, Orthanc IDs), `messages` (the
JSON objects of the wire), `planner` (the bucket plan), `chunks` (chunk URIs and byte ranges),
`codecs` (bucket payload compression).
"""
