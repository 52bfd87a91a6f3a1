"""DICOM front door: association policy, C-ECHO, C-STORE and Storage Commitment SCP."""
