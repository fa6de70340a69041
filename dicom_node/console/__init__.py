"""The web console and REST API of ``srnode serve`` (mounted by :mod:`dicom_node.http_server`).

:mod:`~dicom_node.console.api` the REST API under ``/api/``, :mod:`~dicom_node.console.pages`
the server-rendered pages under ``/console/``, :mod:`~dicom_node.console.views` what both show,
:mod:`~dicom_node.console.pictures` the before/after pictures.
"""
