"""DICOM service handlers: small functions bound to pynetdicom events, one module per role."""
