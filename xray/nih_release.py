"""The NIH ChestX-ray14 release as data: its 12 image archives and its metadata files.

The archive links are the ones the NIH publishes in ``batch_download_zips.py`` beside the data
(https://nihcc.app.box.com/v/ChestXray-NIHCC), in that order; the script saves them as
``images_01.tar.gz`` ... ``images_12.tar.gz``, and each holds ``images/<name>.png``. The image
count and the first and last image name of each part follow from the release's sorted image names
(``Data_Entry_2017_v2020.csv``: 112 120 rows) cut at 4 999, then ten times 10 000, then 7 121, the
folder sizes of the unpacked release (``images_001`` ... ``images_012``); `xray download` checks
every archive against them before unpacking it.
"""

from __future__ import annotations

from dataclasses import dataclass

N_IMAGES = 112_120


@dataclass(frozen=True)
class Part:
    """One image archive of the release."""

    number: int  # 1..12
    url: str
    n_images: int
    first: str  # first and last image name it holds (names sort in patient, follow-up order)
    last: str

    @property
    def archive(self) -> str:
        """The file name NIH's script saves it as (and a mirror serves it under)."""
        return f"images_{self.number:02d}.tar.gz"

    @property
    def folder(self) -> str:
        """The folder it unpacks into: ``images_0NN`` (holding ``images/``), the NIH layout."""
        return f"images_{self.number:03d}"


_BOX = "https://nihcc.box.com/shared/static/"
PARTS: tuple[Part, ...] = tuple(Part(i + 1, _BOX + key + ".gz", n, first, last) for i, (key, n, first, last) in enumerate([
    ("vfk49d74nhbxq3nqjg0900w5nvkorp5c", 4999, "00000001_000.png", "00001335_006.png"),
    ("i28rlmbvmfjbl8p2n3ril0pptcmcu9d1", 10000, "00001336_000.png", "00003923_013.png"),
    ("f1t00wrtdk94satdfb9olcolqx20z2jp", 10000, "00003923_014.png", "00006585_006.png"),
    ("0aowwzs5lhjrceb3qp67ahp0rd1l1etg", 10000, "00006585_007.png", "00009232_003.png"),
    ("v5e3goj22zr6h8tzualxfsqlqaygfbsn", 10000, "00009232_004.png", "00011558_007.png"),
    ("asi7ikud9jwnkrnkj99jnpfkjdes7l6l", 10000, "00011558_008.png", "00013774_025.png"),
    ("jn1b4mw4n6lnh74ovmcjb8y48h8xj07n", 10000, "00013774_026.png", "00016051_009.png"),
    ("tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j", 10000, "00016051_010.png", "00018387_034.png"),
    ("upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj", 10000, "00018387_035.png", "00020945_049.png"),
    ("l6nilvfa9cg3s28tqv1qc1olm3gnz54p", 10000, "00020945_050.png", "00024717_000.png"),
    ("hhq8fkdgvcari67vfhs7ppg2w6ni4jze", 10000, "00024718_000.png", "00028173_002.png"),
    ("ioqwiy20ihqwyr8pf4c24eazhh281pbu", 7121, "00028173_003.png", "00030805_000.png"),
]))

# Metadata files: the label CSV and the bounding boxes ship (gzipped) with torchxrayvision; the
# official split lists exist only in the Box folder (no static link), so they come from a mirror
# or by hand, else the toolkit's split by patient id is used (xray.nih.split).
LABELS_CSV = "Data_Entry_2017_v2020.csv"
BBOX_CSV = "BBox_List_2017.csv"
SPLIT_LISTS = ("train_val_list.txt", "test_list.txt")
BOX_FOLDER = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
